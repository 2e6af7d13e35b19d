"""ProGuard's RL rewards as plain functions with the signature TRL's ``GRPOTrainer(reward_funcs=...)``
calls: ``f(completions, **columns) -> list[float]``, where ``columns`` are dataset columns (here
``extra_info``, one dict per sample, as written by ``training.export``).

Semantics follow ProGuard's train/verl/utils/reward_score/safety_grm.py (``compute_score``):
- format: the completion must be exactly ``<think…>…</think…>\\n<answer>\\nRequest:…[\\nResponse:…]\\n
  Category:…\\n</answer>`` (``Response`` absent for image-only samples; ``Category:None`` iff safe).
  ProGuard's training regex uses ``<thinking>``, its deployed prompt asks for ``<think>``: both pass.
  Badly formatted completions score 0 in total, as in ProGuard.
- binary: image samples +2 for the right request label; others +1 request, +1 response.
- category (in-taxonomy ground truth): +1 for the right id, +0.5 for another taxonomy id, 0 for free text.
- OOD (ground-truth category held out, ``category == ""``): a taxonomy id scores 0; a free-text
  description scores 0.5 plus a similarity bonus against the category name and its synonym bank:
  ``max((max_sim-a)/(1-a), (mean_sim-b)/(1-b)) * 0.5`` when positive. ProGuard uses a=0.7, b=0.6 with
  BGE-M3 similarities; here similarity is the cosine of MiniLM embeddings from the shipped wheel, whose
  scale is lower (near paraphrases ≈ 0.6-0.7, unrelated phrases ≈ 0.1-0.2), so the default floors are
  a=0.5, b=0.4. Pass ``floors=PROGUARD_FLOORS`` with a BGE-M3 similarity to reproduce ProGuard exactly
  (see ``total_reward`` for the one deliberate difference: a missed OOD image).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

_TAG = r"<(think|thinking)>.*?</\1>"
_IMAGE = re.compile(
    _TAG + r"\r?\n<answer>\r?\nRequest:(safe|unsafe)\r?\nCategory:([^\r\n]+)\r?\n</answer>\s*$", re.DOTALL
)
_OTHER = re.compile(
    _TAG + r"\r?\n<answer>\r?\nRequest:(safe|unsafe)\r?\nResponse:(safe|unsafe)\r?\nCategory:([^\r\n]+)\r?\n"
    r"</answer>\s*$",
    re.DOTALL,
)
_CODE = re.compile(r"^C\d+(S\d+)?$")

Completion = str | list[dict[str, Any]]
PROGUARD_FLOORS = (0.7, 0.6)  # ProGuard's (max, mean) similarity floors, calibrated for BGE-M3
MINILM_FLOORS = (0.5, 0.4)
Similarity = Callable[[str, Sequence[str]], list[float]]


def _text(c: Completion) -> str:
    if isinstance(c, str):
        return c.strip()
    return str(c[-1].get("content", "")).strip() if c else ""


def parse(completion: Completion, modality: str) -> tuple[str, str, str] | None:
    """(request, response, category) when the completion is well-formed, else ``None``."""
    t = _text(completion)
    if modality == "image":
        m = _IMAGE.match(t)
        if not m:
            return None
        req, resp, cat = m.group(2), "", m.group(3).strip()
    else:
        m = _OTHER.match(t)
        if not m:
            return None
        req, resp, cat = m.group(2), m.group(3), m.group(4).strip()
    is_safe = req == "safe" and resp in ("", "safe")
    if is_safe != (cat == "None"):
        return None  # Category:None iff the sample is judged safe
    return req, resp, cat


@lru_cache(maxsize=1)
def _embedder() -> Any:
    from guard.embeddings import shared_embedder

    return shared_embedder()


@lru_cache(maxsize=65536)
def _vec(text: str) -> Any:
    return _embedder().encode([text])[0]


def minilm_similarity(text: str, refs: Sequence[str]) -> list[float]:
    a = _vec(text)
    return [float(np.dot(a, _vec(r))) for r in refs]


def format_reward(
    completions: Sequence[Completion], extra_info: Sequence[dict[str, Any]], **_: Any
) -> list[float]:
    return [1.0 if parse(c, e["modality"]) else 0.0 for c, e in zip(completions, extra_info, strict=True)]


def binary_reward(
    completions: Sequence[Completion], extra_info: Sequence[dict[str, Any]], **_: Any
) -> list[float]:
    out = []
    for c, e in zip(completions, extra_info, strict=True):
        p = parse(c, e["modality"])
        if p is None:
            out.append(0.0)
            continue
        req, resp, _cat = p
        if e["modality"] == "image":
            out.append(2.0 if req == e["query_label"] else 0.0)
        else:
            out.append(
                (1.0 if req == e["query_label"] else 0.0) + (1.0 if resp == e["response_label"] else 0.0)
            )
    return out


def _gt_safe(e: dict[str, Any]) -> bool:
    return bool(e["query_label"] == "safe" and e.get("response_label", "safe") in ("safe", ""))


def category_reward(
    completions: Sequence[Completion], extra_info: Sequence[dict[str, Any]], **_: Any
) -> list[float]:
    """In-taxonomy samples only (OOD samples score 0 here; see ``ood_similarity_reward``)."""
    out = []
    for c, e in zip(completions, extra_info, strict=True):
        p = parse(c, e["modality"])
        if p is None or _gt_safe(e) or e["category"] == "" or p[2] == "None":
            out.append(0.0)
            continue
        out.append(1.0 if p[2] == e["category"] else (0.5 if _CODE.match(p[2]) else 0.0))
    return out


def ood_score(
    description: str,
    name: str,
    synonyms: Sequence[str],
    similarity: Similarity,
    floors: tuple[float, float] = MINILM_FLOORS,
) -> float:
    if _CODE.match(description):
        return 0.0
    if not name:  # safety_grm.py skips the similarity calls without a category name: the base only
        return 0.5
    a, b = floors
    sims = similarity(description, [name, *synonyms])
    bonus = max((max(sims) - a) / (1 - a) * 0.5, (sum(sims) / len(sims) - b) / (1 - b) * 0.5)
    return 0.5 + max(bonus, 0.0)


def ood_similarity_reward(
    completions: Sequence[Completion],
    extra_info: Sequence[dict[str, Any]],
    similarity: Similarity = minilm_similarity,
    floors: tuple[float, float] = MINILM_FLOORS,
    **_: Any,
) -> list[float]:
    out = []
    for c, e in zip(completions, extra_info, strict=True):
        p = parse(c, e["modality"])
        if p is None or _gt_safe(e) or e["category"] != "" or p[2] == "None":
            out.append(0.0)
            continue
        out.append(
            ood_score(p[2], e["original_category"], e.get("synonymous_phrase", []), similarity, floors)
        )
    return out


def total_reward(
    completions: Sequence[Completion],
    extra_info: Sequence[dict[str, Any]],
    similarity: Similarity = minilm_similarity,
    floors: tuple[float, float] = MINILM_FLOORS,
    proguard_image_quirk: bool = False,
    **_: Any,
) -> list[float]:
    """ProGuard's composite score: 0 if malformed, else binary + (category or OOD) reward.

    With ``floors=PROGUARD_FLOORS`` and ProGuard's similarity this is ``compute_score`` of
    safety_grm.py, with one deliberate difference: an out-of-taxonomy *image* sample (unsafe ground
    truth) answered ``Request:safe`` scores 0 here and 0.5 in ProGuard. There, the early return for safe
    answers tests ``answer_response_label == "safe"``, which is "" for image answers, so a safe image
    answer falls through to the OOD branch and collects its 0.5 base for a description it never gave —
    rewarding a missed unsafe image over an unsafe answer with a taxonomy id (0). We treat that as a bug;
    ``proguard_image_quirk=True`` reproduces it for comparisons with ProGuard's own numbers.
    """
    fmt = format_reward(completions, extra_info)
    b = binary_reward(completions, extra_info)
    cat = category_reward(completions, extra_info)
    ood = ood_similarity_reward(completions, extra_info, similarity=similarity, floors=floors)
    out = [0.0 if f == 0 else bb + cc + oo for f, bb, cc, oo in zip(fmt, b, cat, ood, strict=True)]
    if proguard_image_quirk:
        for i, (c, e) in enumerate(zip(completions, extra_info, strict=True)):
            p = parse(c, e["modality"])
            if p and e["modality"] == "image" and not _gt_safe(e) and e["category"] == "" and p[0] == "safe":
                out[i] += 0.5
    return out


def make_reward_funcs(
    floors: tuple[float, float] = MINILM_FLOORS, similarity: Similarity = minilm_similarity
) -> list[Callable[..., list[float]]]:
    """The reward functions for TRL's ``GRPOTrainer(reward_funcs=...)`` with the OOD similarity and its
    floors bound (TRL only passes dataset columns). Each keeps its name: TRL logs rewards by
    ``__name__`` and the launcher's ``reward_weights`` are keyed by it."""

    def ood_similarity_reward(
        completions: Sequence[Completion], extra_info: Sequence[dict[str, Any]], **_: Any
    ) -> list[float]:
        return _ood_reward(completions, extra_info, similarity=similarity, floors=floors)

    return [format_reward, binary_reward, category_reward, ood_similarity_reward]


_ood_reward = ood_similarity_reward
REWARD_FUNCS = [format_reward, binary_reward, category_reward, ood_similarity_reward]
