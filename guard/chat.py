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


def p_unsafe_from_logprobs(tokens: Sequence[str], top: Sequence[dict[str, float]]) -> float | None:
    """P(unsafe) at the ``Request:`` label, from the generated tokens and their top-k logprobs.

    Finds the first generated token after ``Request:`` inside the answer, then normalises the mass of
    the top-k candidates that start the word "unsafe" against those that start "safe":
    ``p = e^u / (e^u + e^s)``. A label missing from the top-k counts as zero mass. ``None`` when the
    output has no such position (truncated or malformed) or no logprobs were returned.
    """
    if not tokens or len(tokens) != len(top):
        return None
    text = ""
    answer_at = -1
    for i, tok in enumerate(tokens):
        before = text
        text += tok
        if answer_at < 0 and "<answer>" in text:
            answer_at = len(text)
        if answer_at < 0:
            continue
        tail = before[max(answer_at, 0) :]
        if tail.rstrip(" ").endswith("Request:") and tok.strip():
            unsafe = [lp for t, lp in top[i].items() if t.strip().lower().startswith("uns")]
            safe = [lp for t, lp in top[i].items() if t.strip().lower().startswith("safe")]
            mu = sum(math.exp(x) for x in unsafe)
            ms = sum(math.exp(x) for x in safe)
            return None if mu + ms == 0 else mu / (mu + ms)
    return None


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
    part gives the category), a parse error if any part failed, P(unsafe) the maximum."""
    if len(parts) == 1:
        return parts[0]
    failed = [v for v in parts if v.parse_error]
    unsafe = [v for v in parts if v.safe is False and not v.parse_error]
    base = unsafe[0] if unsafe else (failed[0] if failed else parts[0])
    probs = [v.p_unsafe for v in parts if v.p_unsafe is not None]
    merged = Verdict(
        safe=False if unsafe else (None if failed else base.safe),
        category=base.category,
        subcategory=base.subcategory,
        novel_risk=base.novel_risk,
        p_unsafe=max(probs) if probs else None,
        reasoning="\n---\n".join(v.reasoning for v in parts if v.reasoning) or None,
        raw_output="\n---\n".join(v.raw_output for v in parts if v.raw_output) or None,
        parse_error=bool(failed) and not unsafe,
        extra={**base.extra, "images_judged": str(len(parts))},
    )
    return merged
