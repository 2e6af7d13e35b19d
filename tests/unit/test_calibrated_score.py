"""P(unsafe) from top-k logprobs must not depend on how the tokenizer splits ``Request:unsafe`` / ``safe``.

The logprobs here come from a small explicit model of the answer: the label is ``unsafe`` with
probability ``p``, and each split of the same answer text spreads that choice over the positions the
split implies. Whatever the split, the reader must return ``p``.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.chat import p_unsafe_from_forced, p_unsafe_from_logprobs, teacher_forced_label_texts


def answer(label: str, sep: str = ":", think: str = "looks fine") -> str:
    return (
        f"<think>\n{think}\n</think>\n<answer>\nRequest{sep}{label}\nResponse:safe\n"
        f"Category:{'C9S1' if label == 'unsafe' else 'None'}\n</answer>"
    )


def split_at(text: str, cuts: set[int]) -> list[str]:
    edges = [0, *sorted(c for c in cuts if 0 < c < len(text)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(edges)]


def label_start(text: str) -> int:
    """Offset of the answer's label (after "<answer>\nRequest" and its separator)."""
    return list(re.finditer(r"<answer>\nRequest[ :：\n]*", text))[-1].end()


def logprobs_for(
    tokens: list[str], label: str, p: float, other_len: int, ambiguous_competitor: bool
) -> list[dict[str, float]]:
    """Top-k logprobs of a model whose answer label is "unsafe" with probability ``p``, for this split.

    At the token that reaches into the label (``X + Y``, X before the label) the other label's mass sits
    on ``X + other[:other_len]``, or, when ``ambiguous_competitor`` and X is not empty, on ``X`` alone
    (a tokenizer that has ``X + label`` as one token writes the other label as ``X`` then the label,
    like Qwen's ``:s`` / ``:``). Every other position is certain, plus an off-path distractor."""
    text = "".join(tokens)
    at = label_start(text)
    other = "safe" if label == "unsafe" else "unsafe"
    p_label = p if label == "unsafe" else 1.0 - p
    tops: list[dict[str, float]] = []
    pos = 0
    for tok in tokens:
        start, pos = pos, pos + len(tok)
        if start <= at < pos:
            x = text[start:at]
            competitor = x if (ambiguous_competitor and x) else x + other[:other_len]
            tops.append({tok: math.log(p_label), competitor: math.log(1.0 - p_label), "§": -4.0})
        else:
            tops.append({tok: 0.0, "§": -6.0})
    return tops


# Qwen2/2.5's byte-level BPE (the tokenizer.json shipped with Qwen2.5-VL-7B-Instruct, which ProGuard-7B
# uses) splits the two answers differently — measured against that tokenizer in the audit behind
# issue 15: "Request:unsafe" -> ["Request", ":", "unsafe"], "Request:safe" -> ["Request", ":s", "afe"].
QWEN_UNSAFE = [
    "<think>",
    "\n",
    "looks",
    " fine",
    "\n",
    "</think>",
    "\n",
    "<answer>",
    "\n",
    "Request",
    ":",
    "unsafe",
]
QWEN_SAFE = [
    "<think>",
    "\n",
    "looks",
    " fine",
    "\n",
    "</think>",
    "\n",
    "<answer>",
    "\n",
    "Request",
    ":s",
    "afe",
]
QWEN_TAIL_UNSAFE = ["\n", "Response", ":s", "afe", "\n", "Category", ":C", "9", "S", "1", "\n", "</answer>"]
QWEN_TAIL_SAFE = ["\n", "Response", ":s", "afe", "\n", "Category", ":", "None", "\n", "</answer>"]


@pytest.mark.parametrize("p", [0.02, 0.3, 0.5, 0.93])
def test_qwen_split_of_both_answers_gives_the_same_score(p: float) -> None:
    # unsafe answer: the choice is made at ":" (":" → "unsafe", or ":s" → "afe")
    toks = QWEN_UNSAFE + QWEN_TAIL_UNSAFE
    assert "".join(toks) == answer("unsafe")
    tops: list[dict[str, float]] = [{t: 0.0} for t in toks]
    colon = QWEN_UNSAFE.index(":")
    tops[colon] = {":": math.log(p), ":s": math.log(1 - p), "s": -7.0}
    tops[colon + 1] = {"unsafe": 0.0}
    assert p_unsafe_from_logprobs(toks, tops) == pytest.approx(p)
    # safe answer: the choice is made at ":s" (":s" → safe, or ":" which goes on as "unsafe")
    toks = QWEN_SAFE + QWEN_TAIL_SAFE
    assert "".join(toks) == answer("safe")
    tops = [{t: 0.0} for t in toks]
    tops[QWEN_SAFE.index(":s")] = {":s": math.log(1 - p), ":": math.log(p), "s": -7.0}
    assert p_unsafe_from_logprobs(toks, tops) == pytest.approx(p)


@settings(max_examples=300, deadline=None)
@given(
    label=st.sampled_from(["unsafe", "safe"]),
    sep=st.sampled_from([":", ": ", "：", ":\n", " : "]),
    p=st.floats(min_value=0.001, max_value=0.999),
    cuts=st.sets(st.integers(min_value=1, max_value=200), max_size=80),
    other_len=st.integers(min_value=1, max_value=6),
    ambiguous_competitor=st.booleans(),
)
def test_score_is_the_same_whatever_the_split(
    label: str, sep: str, p: float, cuts: set[int], other_len: int, ambiguous_competitor: bool
) -> None:
    text = answer(label, sep, think="maybe Request:unsafe? <answer> no")
    toks = split_at(text, cuts)
    tops = logprobs_for(toks, label, p, other_len, ambiguous_competitor)
    assert p_unsafe_from_logprobs(toks, tops) == pytest.approx(p, rel=1e-9, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(p=st.floats(min_value=0.001, max_value=0.999), cut=st.integers(min_value=1, max_value=60))
def test_choice_made_before_the_label_is_read_where_it_was_made(p: float, cut: int) -> None:
    """The generated token stops right before the label (like Qwen's ":"); the other label started in a
    longer candidate at that position; the label token after it is then certain."""
    for label in ("unsafe", "safe"):
        text = answer(label)
        at = label_start(text)
        toks = split_at(text, {cut, at - 1, at, at + 2})
        other = "safe" if label == "unsafe" else "unsafe"
        p_label = p if label == "unsafe" else 1 - p
        tops: list[dict[str, float]] = [{t: 0.0} for t in toks]
        i = [len("".join(toks[:k])) for k in range(len(toks))].index(at - 1)  # the ":" token
        tops[i] = {":": math.log(p_label), ":" + other[:2]: math.log(1 - p_label)}
        assert p_unsafe_from_logprobs(toks, tops) == pytest.approx(p)


def test_the_old_reader_cases_still_hold() -> None:
    assert p_unsafe_from_logprobs([], []) is None
    assert p_unsafe_from_logprobs(["<think>", "x"], [{}, {}]) is None
    assert p_unsafe_from_logprobs(["a"], []) is None
    # truncated before the label: no score
    toks = split_at(answer("unsafe")[: answer("unsafe").index("Request") + 8], {5, 20})
    assert p_unsafe_from_logprobs(toks, [{t: 0.0} for t in toks]) is None
    # the deciding position has no label candidate at all
    toks = split_at(answer("safe"), {label_start(answer("safe"))})
    assert p_unsafe_from_logprobs(toks, [{"zzz": 0.0} for _ in toks]) is None


def test_teacher_forced_texts_and_score() -> None:
    raw = answer("safe", sep=": ")
    u, s = teacher_forced_label_texts(raw) or ("", "")
    assert u.endswith("<answer>\nRequest: unsafe\n") and s.endswith("<answer>\nRequest: safe\n")
    assert teacher_forced_label_texts("<think>x</think>") is None
    # Qwen-like ids: common prefix [..., Request], then [":", "unsafe", "\n"] vs [":s", "afe", "\n"]
    pu = p_unsafe_from_forced(
        [1, 2, 10, 11, 5], [-0.1, -0.2, -1.0, -0.1, 0.0], [1, 2, 12, 13, 5], [-0.1, -0.2, -0.5, -0.2, 0.0]
    )
    lu, ls = -1.1, -0.7
    assert pu == pytest.approx(math.exp(lu) / (math.exp(lu) + math.exp(ls)))
    assert p_unsafe_from_forced([1, 2], [0.0, 0.0], [1, 2], [0.0, 0.0]) is None
    assert p_unsafe_from_forced([1], [0.0, 0.0], [2], [0.0]) is None
