"""Parse ProGuard's raw generation into a ``Verdict``. Total: never raises, whatever the input.

Output format (ProGuard deploy/prompts.py, "Output Format")::

    <think>\n...\n</think>\n<answer>\nRequest:unsafe\nResponse:safe\nCategory:C9S1\n</answer>

Image prompts have no ``Response`` line. The RL reward in ProGuard's training code
(train/verl/utils/reward_score/safety_grm.py) matches ``<thinking>`` tags, so both tag spellings are
accepted. ``Category`` is ``None`` (safe), a taxonomy id (``C*S*``; text-image prompts ask for ``C*``),
or a free-text guessed category name (~4 words): that is the novel, out-of-taxonomy risk description.

An unsafe label is a decision and is never turned into a parse error (which dead-letters the post): a
category the taxonomy lacks, a missing category or an echoed ``C*S*`` placeholder, or a broken
``Response`` line after ``Request:unsafe`` keep ``safe=False`` and are flagged in ``extra``
(``unknown_category``, ``category_missing``, ``response_label_invalid``).
"""

from __future__ import annotations

import re

from guard.taxonomy import Taxonomy
from guard.types import Verdict

_THINK = re.compile(r"<(think|thinking)>(?P<body>.*?)</\1>", re.DOTALL | re.IGNORECASE)
_ANSWER = re.compile(r"<answer>(?P<body>.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FIELD = re.compile(r"^\s*(request|response|category)\s*[:：]\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)
# A leading taxonomy-shaped code is the category, whatever follows it ("C9S1: Self-Harm and Suicide",
# "C9S1.", "C9S1 (self-harm)"); the rest is the model restating the name, not a novel risk.
_CODE = re.compile(r"^((C\d+)(S\d+)?)\b", re.IGNORECASE)
_TEMPLATE_ECHO = re.compile(r"^\**C\*(S\*)?\**$", re.IGNORECASE)  # the prompt's own "C*S*" placeholder
MAX_NOVEL_RISK_CHARS = 120
MAX_RAW_CHARS = 8000


def _label(value: str | None) -> bool | None:
    """``True`` for unsafe, ``False`` for safe, ``None`` for anything else."""
    if value is None:
        return None
    v = value.strip().strip(".*` ").lower()
    if v == "unsafe":
        return True
    if v == "safe":
        return False
    return None


def _error(raw: str, reason: str, reasoning: str | None) -> Verdict:
    return Verdict(
        safe=None,
        parse_error=True,
        raw_output=raw[:MAX_RAW_CHARS],
        reasoning=reasoning,
        extra={"parse_error_reason": reason},
    )


def parse_output(raw: str, taxonomy: Taxonomy, *, image_only: bool = False) -> Verdict:
    """Turn one generation into a verdict; malformed output gives ``parse_error=True`` and keeps ``raw``."""
    try:
        return _parse(raw, taxonomy, image_only=image_only)
    except Exception as exc:  # pragma: no cover - defensive: the parser must be total
        return _error(str(raw)[:MAX_RAW_CHARS], f"parser failure: {type(exc).__name__}", None)


def _parse(raw: str, taxonomy: Taxonomy, *, image_only: bool) -> Verdict:
    if not isinstance(raw, str):
        return _error(repr(raw), "output is not text", None)
    think = _THINK.search(raw)
    reasoning = think.group("body").strip() if think else None
    answers = list(_ANSWER.finditer(raw))
    if not answers:
        return _error(raw, "no complete <answer>...</answer> block (truncated or malformed)", reasoning)
    body = answers[-1].group("body")
    fields: dict[str, str] = {}
    for m in _FIELD.finditer(body):
        fields.setdefault(m.group(1).lower(), m.group(2))
    request = _label(fields.get("request"))
    if request is None:
        return _error(raw, f"Request label missing or not safe/unsafe: {fields.get('request')!r}", reasoning)
    extra: dict[str, str] = {}
    response: bool | None = None
    if not image_only and "response" in fields:
        response = _label(fields["response"])
        if response is None and _is_none(fields["response"]):
            pass  # no agent reply was judged (posts have none): the request label decides
        elif response is None and request:
            # An unsafe request is a decision on its own: a broken Response line must not lose it.
            extra["response_label_invalid"] = fields["response"][:40]
        elif response is None:
            return _error(raw, f"Response label not safe/unsafe: {fields['response']!r}", reasoning)
    unsafe = request or bool(response)
    if not unsafe:
        return Verdict(safe=True, reasoning=reasoning, raw_output=raw[:MAX_RAW_CHARS])
    v = Verdict(safe=False, reasoning=reasoning, raw_output=raw[:MAX_RAW_CHARS], extra=extra)
    category_field = (fields.get("category") or "").strip().strip("`\"' ")
    category_raw = category_field.strip("`*\"' ")
    code = _CODE.match(category_raw)
    if code:
        wanted = code.group(1).upper()
        resolved = taxonomy.resolve(wanted)
        if resolved is None:
            # A well-formed code is a code, never a novel-risk description: keep the unsafe decision,
            # fall back to its main category when that exists (C9S9 → C9), flag what the model said.
            v.extra["unknown_category"] = wanted
            resolved = taxonomy.resolve(code.group(2)) if code.group(3) else None
        if resolved is not None:
            v.category = resolved.category.id
            v.subcategory = resolved.subcategory.id if resolved.subcategory else None
        return v
    if not category_raw or category_raw.lower() == "none":
        v.extra["category_missing"] = "unsafe without a category"
        return v
    if _TEMPLATE_ECHO.match(category_field):
        v.extra["category_missing"] = f"the model echoed the template: {category_field[:20]!r}"
        return v
    v.novel_risk = " ".join(category_raw.split())[:MAX_NOVEL_RISK_CHARS]
    return v


def _is_none(value: str) -> bool:
    return value.strip().strip(".*`\"' ").lower() in ("none", "n/a", "")


def format_output(
    *, unsafe: bool, category: str | None = None, reasoning: str = "", image_only: bool = False
) -> str:
    """Render a ProGuard-format answer (used by tests and the canned chat-completions server)."""
    lines = ["Request:unsafe" if unsafe else "Request:safe"]
    if not image_only:
        lines.append("Response:safe")
    lines.append(f"Category:{category if unsafe and category else 'None'}")
    return "<think>\n" + reasoning + "\n</think>\n<answer>\n" + "\n".join(lines) + "\n</answer>"
