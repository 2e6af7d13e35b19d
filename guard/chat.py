"""Chat construction shared by the generative engines, following ProGuard's deploy/inference.py.

``inference.py`` sends ``[{"role": "system", "content": SYSTEM}, {"role": "user", "content": [
image parts..., {"type": "text", "text": USER}]}]`` (text " " if an image comes with no text).
The server engine sends exactly that (images as data URLs). The in-process vLLM engine renders the same
conversation with Qwen2.5-VL's chat template (``render_qwen2_5_vl``) and passes the images as
``multi_modal_data``, which is what vLLM's OpenAI server does internally for this model.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Sequence
from typing import Any

from PIL import Image

from guard.prompts import PromptSet, RenderedPrompt
from guard.types import ModerationItem, Verdict

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def render(prompts: PromptSet, item: ModerationItem) -> RenderedPrompt:
    return prompts.render(item.modality, item.text, len(item.images))


def user_text(r: RenderedPrompt) -> str:
    if r.user and r.user.strip():
        return r.user
    return " " if r.n_images else ""


def image_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def openai_messages(prompts: PromptSet, item: ModerationItem) -> list[dict[str, Any]]:
    r = render(prompts, item)
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": image_data_url(i)}} for i in item.images
    ]
    content.append({"type": "text", "text": user_text(r)})
    return [{"role": "system", "content": r.system}, {"role": "user", "content": content}]


def render_qwen2_5_vl(system: str, text: str, n_images: int) -> str:
    """Qwen2.5-VL chat template for one system + one user turn, with the generation prompt."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_PLACEHOLDER * n_images}{text}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# The answer's request label, as the parser reads it: ``<answer>``, then ``Request``, a colon (ASCII or
# full-width), optional whitespace (a space or a newline), then the label. The last match wins, as in
# the parser (a ``Request:`` inside ``<think>`` is not the answer).
_LABEL_AT = re.compile(r"<answer>\s*Request[ \t]*[:：]\s*(unsafe|safe)", re.IGNORECASE)
_KEY = "request"
_LABELS = ("unsafe", "safe")
_AMBIGUOUS = ""  # consistent with both labels: the text has not reached the label's first character


def _classify_tail(tail: str) -> str | None:
    """Which label a string after ``<answer>`` is consistent with: "unsafe", "safe", ``_AMBIGUOUS``
    (both: the label has not started yet) or ``None`` (neither: it left the ``Request:`` line).

    The two labels differ at their first character, so a string commits to one exactly when it
    reaches into the label."""
    i, n = 0, len(tail)
    while i < n and tail[i].isspace():
        i += 1
    for ch in _KEY:
        if i == n:
            return _AMBIGUOUS
        if tail[i].lower() != ch:
            return None
        i += 1
    while i < n and tail[i] in " \t":
        i += 1
    if i == n:
        return _AMBIGUOUS
    if tail[i] not in ":：":
        return None
    i += 1
    while i < n and tail[i].isspace():
        i += 1
    if i == n:
        return _AMBIGUOUS
    rest = tail[i:].lower()
    for label in _LABELS:
        if label.startswith(rest) or rest.startswith(label):
            return label
    return None


def p_unsafe_from_logprobs(tokens: Sequence[str], top: Sequence[dict[str, float]]) -> float | None:
    """P(unsafe) of the answer's ``Request:`` label from the generated tokens and their top-k logprobs,
    whatever the tokenizer's split of ``Request:unsafe`` / ``Request:safe``.

    Qwen2/2.5's BPE splits ``Request:unsafe`` as ``Request | : | unsafe`` but ``Request:safe`` as
    ``Request | :s | afe``: the choice between the labels is made at the ``:`` position for one and at
    the label position for the other. So candidates are classified by the text they produce, not by
    their spelling: at each position from ``<answer>`` to the first token that reaches into the label,
    a top-k candidate is *unsafe* or *safe* when the text so far plus the candidate is consistent with
    only ``…Request:unsafe`` or only ``…Request:safe`` (a space, ``：`` or a newline may precede the
    label), *ambiguous* while it stops before the label, and ignored otherwise. Walking back from the
    deciding position, ``p = (U + A·p_next) / (U + S + A)`` with U, S, A the candidates' probability
    mass: an ambiguous candidate is assumed to continue like the generated one, whose continuation is
    observed. At the deciding position itself an ambiguous candidate (``:`` when ``:s`` was generated)
    has no observed continuation; it is given the one label that no other candidate there extends it
    into (a tokenizer that has ``:s`` writes ``:safe`` with it, so ``:`` leads to ``unsafe``) and is
    left out when that does not single out a label. Candidates outside the top-k count as zero mass.

    ``None`` when the answer has no ``Request`` label (truncated or malformed), the logprobs do not
    line up with the tokens, or no candidate at the deciding position is a label.
    """
    if not tokens or len(tokens) != len(top):
        return None
    text = "".join(tokens)
    matches = list(_LABEL_AT.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    anchor, label_at = m.start() + len("<answer>"), m.start(1)
    starts: list[int] = []
    pos = 0
    for tok in tokens:
        starts.append(pos)
        pos += len(tok)
    first = next(i for i, t in enumerate(tokens) if starts[i] + len(t) >= anchor)
    last = next(i for i, t in enumerate(tokens) if starts[i] + len(t) > label_at)

    def classify(i: int, cand: str) -> str | None:
        st = starts[i]
        if st >= anchor:
            return _classify_tail(text[anchor:st] + cand)
        head = text[st:anchor]  # the candidate must first reproduce the rest of "<answer>"
        if len(cand) <= len(head):
            return _AMBIGUOUS if head.startswith(cand) else None
        return _classify_tail(cand[len(head) :]) if cand.startswith(head) else None

    # the deciding position
    kinds = {c: classify(last, c) for c in top[last]}
    mass = {"unsafe": 0.0, "safe": 0.0}
    for cand, kind in kinds.items():
        if kind in mass:
            mass[kind] += math.exp(top[last][cand])
    for cand, kind in kinds.items():
        if kind != _AMBIGUOUS:
            continue
        extended_into = {k for c, k in kinds.items() if k in mass and c != cand and c.startswith(cand)}
        others = [lab for lab in _LABELS if lab not in extended_into]
        if len(others) == 1 and extended_into:
            mass[others[0]] += math.exp(top[last][cand])
    if mass["unsafe"] + mass["safe"] == 0.0:
        return None
    p = mass["unsafe"] / (mass["unsafe"] + mass["safe"])
    # back through the positions before it, where the generated token was still ambiguous
    for i in range(last - 1, first - 1, -1):
        u = s = a = 0.0
        for cand, lp in top[i].items():
            kind = classify(i, cand)
            if kind == "unsafe":
                u += math.exp(lp)
            elif kind == "safe":
                s += math.exp(lp)
            elif kind == _AMBIGUOUS:
                a += math.exp(lp)
        if u + s + a > 0.0:
            p = (u + a * p) / (u + s + a)
    return min(1.0, max(0.0, p))


def teacher_forced_label_texts(generated: str) -> tuple[str, str] | None:
    """The generated text cut before its ``Request`` label and completed with each label and the line
    break after it (``…Request:unsafe\n``, ``…Request:safe\n``), for engines that can score both
    continuations directly (vLLM ``prompt_logprobs``). ``None`` when there is no label."""
    matches = list(_LABEL_AT.finditer(generated))
    if not matches:
        return None
    head = generated[: matches[-1].start(1)]
    return head + "unsafe\n", head + "safe\n"


def p_unsafe_from_forced(
    unsafe_ids: Sequence[int],
    unsafe_logprobs: Sequence[float],
    safe_ids: Sequence[int],
    safe_logprobs: Sequence[float],
) -> float | None:
    """P(unsafe) from the per-token logprobs of the two teacher-forced texts of
    ``teacher_forced_label_texts`` (each tokenized whole, so each label gets its tokenizer's own split).
    Sums each sequence's logprobs after the longest common token prefix: ``log P(label | prefix)``,
    exact for any split, then ``p = e^u / (e^u + e^s)``."""
    if len(unsafe_ids) != len(unsafe_logprobs) or len(safe_ids) != len(safe_logprobs):
        return None
    k = 0
    while k < min(len(unsafe_ids), len(safe_ids)) and unsafe_ids[k] == safe_ids[k]:
        k += 1
    if k == len(unsafe_ids) or k == len(safe_ids):
        return None
    lu, ls = sum(unsafe_logprobs[k:]), sum(safe_logprobs[k:])
    return 1.0 / (1.0 + math.exp(min(ls - lu, 700.0)))


def expand(batch: Sequence[ModerationItem], images_per_prompt: int = 1) -> list[tuple[int, ModerationItem]]:
    """ProGuard's prompts describe one image: a post with k images becomes k requests (its text with
    each image), all judged in the same batch. Returns (index into batch, request item)."""
    out: list[tuple[int, ModerationItem]] = []
    for i, it in enumerate(batch):
        if len(it.images) <= images_per_prompt:
            out.append((i, it))
            continue
        for j in range(0, len(it.images), images_per_prompt):
            out.append((i, ModerationItem(it.post_id, it.text, it.images[j : j + images_per_prompt])))
    return out


def combine(parts: Sequence[Verdict]) -> Verdict:
    """One verdict per post from its per-image verdicts: unsafe if any part is unsafe (the first unsafe
    part gives the category), else a parse error if any part failed, else safe. P(unsafe) is the
    maximum. A part that failed to parse never hides another part's clear unsafe decision: an unsafe
    post is published, not dead-lettered, and ``extra["images_failed"]`` says how many parts failed."""
    if len(parts) == 1:
        return parts[0]
    failed = [v for v in parts if v.parse_error]
    unsafe = [v for v in parts if v.safe is False]
    # an unsafe part with a clean parse is the better source of the category
    unsafe.sort(key=lambda v: v.parse_error)
    base = unsafe[0] if unsafe else (failed[0] if failed else parts[0])
    probs = [v.p_unsafe for v in parts if v.p_unsafe is not None]
    extra = {**base.extra, "images_judged": str(len(parts))}
    if failed:
        extra["images_failed"] = str(len(failed))
    return Verdict(
        safe=False if unsafe else (None if failed else base.safe),
        category=base.category,
        subcategory=base.subcategory,
        novel_risk=base.novel_risk,
        p_unsafe=max(probs) if probs else None,
        reasoning="\n---\n".join(v.reasoning for v in parts if v.reasoning) or None,
        raw_output="\n---\n".join(v.raw_output for v in parts if v.raw_output) or None,
        parse_error=bool(failed) and not unsafe,
        extra=extra,
    )
