"""The CPU engine's trained head: MiniLM embedding -> (calibrated p_unsafe, subcategory distribution).

The head is a tiny MLP (or, with no hidden layer, a softmax regression) over 1 + N classes: ``safe`` and
every taxonomy subcategory. ``p_unsafe`` is 1 - P(safe), mapped through an isotonic calibration fitted on
the held-out ``calib`` split; the subcategory distribution is the unsafe classes renormalised. Weights
ship as ``guard/data/cpu_head.npz`` (numpy only at run time, no torch for the head itself); they are
rebuilt by ``python -m training.cpu_head``.

Long posts: MiniLM mean-pools its tokens, so one harmful sentence after a dozen harmless ones is diluted
away (and anything past 256 word pieces is cut). ``windows()`` cuts a post into at most ``MAX_WINDOWS``
sentence-aligned chunks plus the seams between them (overlapping windows); the engine judges each and
keeps the most unsafe one. Cost grows with the post's length (about twice its tokens are encoded).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from guard.embeddings import FloatArray
from guard.taxonomy import DATA_DIR

HEAD_PATH = DATA_DIR / "cpu_head.npz"
WINDOW_WORDS = 32  # a post this short is one window; most training rows are 5-35 words
CHUNK_WORDS = 16  # a long post's windows start this small (about one sentence) and grow only when needed
MAX_WINDOWS = 8  # sentence-aligned windows per post; plus at most 7 seams between neighbours
MAX_WINDOW_WORDS = 180  # about MiniLM's 256 word-piece limit
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def _units(text: str) -> list[list[str]]:
    """Sentences as word lists; a sentence longer than ``WINDOW_WORDS`` is cut into pieces of that size."""
    out: list[list[str]] = []
    for sentence in _SENTENCE_END.split(text):
        w = sentence.split()
        out.extend(w[a : a + WINDOW_WORDS] for a in range(0, len(w), WINDOW_WORDS))
    return out


def _pack(units: list[list[str]], target: int) -> list[list[list[str]]]:
    chunks: list[list[list[str]]] = []
    size = 0
    for u in units:
        if chunks and size + len(u) <= target:
            chunks[-1].append(u)
            size += len(u)
        else:
            chunks.append([u])
            size = len(u)
    return chunks


def windows(text: str) -> list[str]:
    """The windows a post is judged by, in reading order; the engine keeps the most unsafe one.

    A short post is one window. A long one is cut at sentence ends into at most ``MAX_WINDOWS`` chunks,
    each as small as the bound allows (a harmful sentence is diluted by as little harmless text as
    possible: MiniLM mean-pools), plus a window over each seam between neighbouring chunks (the last
    sentence of one and the first of the next), so a statement across a cut is still seen whole. Past
    about 1,200 words, the first seven chunks and the last are judged and the middle is not.
    """
    words = text.split()
    if len(words) <= WINDOW_WORDS:
        return [text]
    units = _units(text)
    target = min(max(CHUNK_WORDS, math.ceil(len(words) / MAX_WINDOWS)), MAX_WINDOW_WORDS)
    chunks = _pack(units, target)
    while len(chunks) > MAX_WINDOWS and target < MAX_WINDOW_WORDS:
        target = min(target + 4, MAX_WINDOW_WORDS)
        chunks = _pack(units, target)
    keep = list(range(len(chunks)))
    if len(keep) > MAX_WINDOWS:
        keep = [*keep[: MAX_WINDOWS - 1], keep[-1]]  # bounded cost; the end stays in view
    out: list[str] = []
    for n, k in enumerate(keep):
        if n and keep[n - 1] == k - 1:
            out.append(" ".join([*chunks[k - 1][-1], *chunks[k][0]]))  # the seam
        out.append(" ".join(w for u in chunks[k] for w in u))
    return out


@dataclass(frozen=True)
class HeadOutput:
    p_unsafe: npt.NDArray[np.float64]  # calibrated, one per row
    p_raw: npt.NDArray[np.float64]  # 1 - P(safe) before calibration
    sub_probs: npt.NDArray[np.float64]  # rows x subcategories, renormalised over the unsafe classes


class CpuHead:
    def __init__(
        self,
        layers: list[tuple[FloatArray, FloatArray]],
        subcategories: list[str],
        iso_x: npt.NDArray[np.float64],
        iso_y: npt.NDArray[np.float64],
        threshold: float,
        novel_confidence: float,
        version: str,
    ) -> None:
        self.layers = layers
        self.subcategories = subcategories
        self.iso_x = iso_x
        self.iso_y = iso_y
        self.threshold = threshold
        self.novel_confidence = novel_confidence
        self.version = version

    @classmethod
    def load(cls, path: Path = HEAD_PATH) -> CpuHead:
        try:
            z = np.load(path, allow_pickle=False)
        except OSError as exc:
            raise FileNotFoundError(
                f"CPU head weights {path} cannot be read ({exc}); "
                "rebuild them with `python -m training.cpu_head`"
            ) from None
        n_layers = int(z["n_layers"])
        layers = [(z[f"w{i}"].astype(np.float32), z[f"b{i}"].astype(np.float32)) for i in range(n_layers)]
        return cls(
            layers=layers,
            subcategories=[str(s) for s in z["subcategories"]],
            iso_x=z["iso_x"].astype(np.float64),
            iso_y=z["iso_y"].astype(np.float64),
            threshold=float(z["threshold"]),
            novel_confidence=float(z["novel_confidence"]),
            version=str(z["version"]),
        )

    def save(self, path: Path, **meta: str) -> None:
        arrays: dict[str, npt.NDArray[np.generic]] = {"n_layers": np.array(len(self.layers))}
        for i, (w, b) in enumerate(self.layers):
            arrays[f"w{i}"] = w.astype(np.float16)  # halves the file; the logits move by < 1e-3
            arrays[f"b{i}"] = b.astype(np.float32)
        arrays |= {
            "subcategories": np.array(self.subcategories),
            "iso_x": self.iso_x,
            "iso_y": self.iso_y,
            "threshold": np.array(self.threshold),
            "novel_confidence": np.array(self.novel_confidence),
            "version": np.array(self.version),
        }
        arrays |= {f"meta_{k}": np.array(v) for k, v in meta.items()}
        with path.open("wb") as f:
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]

    def logits(self, x: FloatArray) -> FloatArray:
        h = x
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        return h

    def calibrate(self, p_raw: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Isotonic map fitted on the calib split (piecewise linear between its steps: monotone)."""
        return np.interp(p_raw, self.iso_x, self.iso_y)

    def __call__(self, x: FloatArray) -> HeadOutput:
        z = self.logits(x).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        p = e / e.sum(axis=1, keepdims=True)
        p_raw = 1.0 - p[:, 0]
        unsafe = p[:, 1:]
        sub = unsafe / np.maximum(unsafe.sum(axis=1, keepdims=True), 1e-12)
        return HeadOutput(self.calibrate(p_raw), p_raw, sub)
