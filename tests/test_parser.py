from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.parser import format_output, parse_output
from guard.prompts import PromptSet


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
    (A("Request:unsafe\nResponse:safe\nCategory:None"), False, (False, None, None, None, True)),
    (A("Request:unsafe\nResponse:safe\nCategory:C99S1"), False, (False, None, None, None, True)),
    (A("Request:unsafe\nResponse:perhaps\nCategory:C1S1"), False, (None, None, None, None, True)),
    ("", False, (None, None, None, None, True)),
]


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
