from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.chat import combine
from guard.parser import format_output, parse_output
from guard.prompts import PromptSet
from guard.types import Verdict


def A(body: str, think: str = "<think>\nreasoning here\n</think>\n") -> str:
    return f"{think}<answer>\n{body}\n</answer>"


CASES = [
    # raw, image_only, expected (safe, category, subcategory, novel_risk, parse_error)
    (A("Request:safe\nResponse:safe\nCategory:None"), False, (True, None, None, None, False)),
    (A("Request:unsafe\nResponse:safe\nCategory:C9S1"), False, (False, "C9", "C9S1", None, False)),
    (A("Request:unsafe\nResponse:unsafe\nCategory:C7S2"), False, (False, "C7", "C7S2", None, False)),
    (A("Request:safe\nResponse:unsafe\nCategory:C4S1"), False, (False, "C4", "C4S1", None, False)),
    (A("Request:unsafe\nResponse:safe\nCategory:C8"), False, (False, "C8", None, None, False)),
    (A("Request:unsafe\nCategory:C11S2"), True, (False, "C11", "C11S2", None, False)),
    (A("Request:safe\nCategory:None"), True, (True, None, None, None, False)),
    # novel, out-of-taxonomy risk: a guessed category name
    (
        A("Request:unsafe\nResponse:safe\nCategory:Dangerous Viral Breath Challenge"),
        False,
        (False, None, None, "Dangerous Viral Breath Challenge", False),
    ),
    # training-time tag spelling, extra spaces, CRLF and case
    (
        "<thinking>x</thinking>\r\n<answer>\r\nRequest: UNSAFE\r\nResponse: safe\r\n"
        "Category: c2s2\r\n</answer>",
        False,
        (False, "C2", "C2S2", None, False),
    ),
    # malformed
    ("<think>\nI am not sure", False, (None, None, None, None, True)),  # truncated
    (A("Request:maybe\nResponse:safe\nCategory:None"), False, (None, None, None, None, True)),
    (A("Response:safe\nCategory:None"), False, (None, None, None, None, True)),
    (A("Request:safe\nResponse:perhaps\nCategory:None"), False, (None, None, None, None, True)),
    ("", False, (None, None, None, None, True)),
]


# Edge cases where an unsafe decision used to be lost (dead-lettered as a parse error) or a category code
# leaked into novel_risk. raw, image_only, (safe, category, subcategory, novel_risk, parse_error), extra.
EDGE_CASES = [
    # a well-formed code the taxonomy lacks: still unsafe, main category when it exists, flagged
    (
        A("Request:unsafe\nResponse:safe\nCategory:C12S1"),
        False,
        (False, None, None, None, False),
        {"unknown_category": "C12S1"},
    ),
    (
        A("Request:unsafe\nResponse:safe\nCategory:C9S9"),
        False,
        (False, "C9", None, None, False),
        {"unknown_category": "C9S9"},
    ),
    (A("Request:unsafe\nCategory:C99"), True, (False, None, None, None, False), {"unknown_category": "C99"}),
    (
        A("Request:unsafe\nResponse:safe\nCategory:C99S1"),
        False,
        (False, None, None, None, False),
        {"unknown_category": "C99S1"},
    ),
    # a leading code is the code, whatever the model wrote after it
    (
        A("Request:unsafe\nResponse:safe\nCategory:C9S1: Self-Harm and Suicide"),
        False,
        (False, "C9", "C9S1", None, False),
        {},
    ),
    (A("Request:unsafe\nResponse:safe\nCategory:C9S1."), False, (False, "C9", "C9S1", None, False), {}),
    (A("Request:unsafe\nResponse:safe\nCategory:**C9S1**"), False, (False, "C9", "C9S1", None, False), {}),
    (A("Request:unsafe\nCategory:`c4s2` (weapons)"), True, (False, "C4", "C4S2", None, False), {}),
    (A("Request:unsafe\nResponse:safe\nCategory:C8 - Privacy"), False, (False, "C8", None, None, False), {}),
    # not a code: a novel risk that merely starts with C and digits stays a novel risk
    (
        A("Request:unsafe\nResponse:safe\nCategory:C4 Explosive Tutorials"),
        False,
        (False, "C4", None, None, False),
        {},
    ),
    (
        A("Request:unsafe\nResponse:safe\nCategory:Crypto Pump Scheme"),
        False,
        (False, None, None, "Crypto Pump Scheme", False),
        {},
    ),
    # the model echoing the template placeholder is not a novel risk
    (
        A("Request:unsafe\nResponse:safe\nCategory:C*S*"),
        False,
        (False, None, None, None, False),
        {"category_missing": "the model echoed the template: 'C*S*'"},
    ),
    (
        A("Request:unsafe\nCategory:C*"),
        True,
        (False, None, None, None, False),
        {"category_missing": "the model echoed the template: 'C*'"},
    ),
    (
        A("Request:unsafe\nResponse:safe\nCategory:None"),
        False,
        (False, None, None, None, False),
        {"category_missing": "unsafe without a category"},
    ),
    (
        A("Request:unsafe\nResponse:safe"),
        False,
        (False, None, None, None, False),
        {"category_missing": "unsafe without a category"},
    ),
    # Request:unsafe keeps its label whatever the Response line says (or if it is missing)
    (A("Request:unsafe\nResponse:None\nCategory:C1S1"), False, (False, "C1", "C1S1", None, False), {}),
    (A("Request:unsafe\nCategory:C1S1"), False, (False, "C1", "C1S1", None, False), {}),
    (
        A("Request:unsafe\nResponse:perhaps\nCategory:C1S1"),
        False,
        (False, "C1", "C1S1", None, False),
        {"response_label_invalid": "perhaps"},
    ),
    (A("Request:safe\nResponse:None\nCategory:None"), False, (True, None, None, None, False), {}),
]


@pytest.mark.parametrize(("raw", "image_only", "expected", "extra"), EDGE_CASES)
def test_edge_cases_keep_the_unsafe_decision(
    prompts: PromptSet,
    raw: str,
    image_only: bool,
    expected: tuple[object, ...],
    extra: dict[str, str],
) -> None:
    v = parse_output(raw, prompts.taxonomy, image_only=image_only)
    assert (v.safe, v.category, v.subcategory, v.novel_risk, v.parse_error) == expected
    assert v.extra == extra


def test_a_failed_image_does_not_hide_another_images_unsafe_verdict(prompts: PromptSet) -> None:
    tax = prompts.taxonomy
    failed = parse_output("<think>\ntruncat", tax, image_only=True)
    unsafe = parse_output(A("Request:unsafe\nCategory:C4S1"), tax, image_only=True)
    safe = parse_output(A("Request:safe\nCategory:None"), tax, image_only=True)
    # an unsafe part that carries a parse error of its own (an unsafe label whose category did not
    # resolve, as older parsers reported it) is still an unsafe decision
    legacy = Verdict(safe=False, parse_error=True, extra={"parse_error_reason": "unsafe without a category"})
    assert combine([failed, legacy]).safe is False
    assert combine([safe, legacy]).safe is False
    for parts in ([failed, unsafe], [unsafe, failed], [safe, failed, unsafe]):
        v = combine(parts)
        assert (v.safe, v.category, v.subcategory, v.parse_error) == (False, "C4", "C4S1", False)
        assert v.extra["images_failed"] == "1" and v.extra["images_judged"] == str(len(parts))
    v = combine([safe, failed])
    assert (v.safe, v.parse_error) == (None, True)
    assert combine([safe, safe]).safe is True


@pytest.mark.parametrize(("raw", "image_only", "expected"), CASES)
def test_realistic_outputs(prompts: PromptSet, raw: str, image_only: bool, expected: tuple) -> None:  # type: ignore[type-arg]
    v = parse_output(raw, prompts.taxonomy, image_only=image_only)
    assert (v.safe, v.category, v.subcategory, v.novel_risk, v.parse_error) == expected
    assert v.raw_output == raw[:8000]
    if v.parse_error:
        assert v.extra["parse_error_reason"]


def test_reasoning_is_kept_separately(prompts: PromptSet) -> None:
    v = parse_output(
        A("Request:safe\nResponse:safe\nCategory:None", "<think>\nlooks fine\n</think>\n"), prompts.taxonomy
    )
    assert v.reasoning == "looks fine"


def test_last_answer_block_wins(prompts: PromptSet) -> None:
    raw = (
        A("Request:safe\nResponse:safe\nCategory:None")
        + "\n"
        + A("Request:unsafe\nResponse:safe\nCategory:C3S1")
    )
    assert parse_output(raw, prompts.taxonomy).subcategory == "C3S1"


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=400))
def test_parser_is_total_on_arbitrary_text(prompts: PromptSet, raw: str) -> None:
    v = parse_output(raw, prompts.taxonomy)
    assert v.parse_error or v.safe is not None
    if v.safe is True:
        assert v.category is None and v.novel_risk is None


fragments = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<thinking>",
        "</thinking>",
        "<answer>",
        "</answer>",
        "Request:",
        "Response:",
        "Category:",
        "safe",
        "unsafe",
        "None",
        "C1S1",
        "C12",
        "\n",
        "\r\n",
        " ",
        "x",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(fragments, max_size=40).map("".join))
def test_parser_is_total_on_near_miss_outputs(prompts: PromptSet, raw: str) -> None:
    v = parse_output(raw, prompts.taxonomy)
    if not v.parse_error:
        assert v.safe is not None
        if v.subcategory:
            assert prompts.taxonomy.resolve(v.subcategory) is not None


@settings(max_examples=200, deadline=None)
@given(
    unsafe=st.booleans(),
    image_only=st.booleans(),
    sub=st.sampled_from(["C1S1", "C5S2", "C9S3", "C11S1", "C3"]),
    reasoning=st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=80),
)
def test_round_trip(prompts: PromptSet, unsafe: bool, image_only: bool, sub: str, reasoning: str) -> None:
    raw = format_output(unsafe=unsafe, category=sub, reasoning=reasoning, image_only=image_only)
    v = parse_output(raw, prompts.taxonomy, image_only=image_only)
    assert not v.parse_error
    assert v.safe is (not unsafe)
    if unsafe:
        assert (v.subcategory or v.category) == sub
