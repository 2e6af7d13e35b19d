"""The CPU engine's trained head: MiniLM embedding -> (calibrated p_unsafe, subcategory distribution).

The head is a tiny MLP (or, with no hidden layer, a softmax regression) over 1 + N classes: ``safe`` and
every taxonomy subcategory. ``p_unsafe`` is 1 - P(safe), mapped through an isotonic calibration fitted on
the held-out ``calib`` split; the subcategory distribution is the unsafe classes renormalised. Weights
ship as ``guard/data/cpu_head.npz`` (numpy only at run time, no torch for the head itself); they are
rebuilt by ``python -m training.cpu_head``.

Long posts: MiniLM mean-pools its tokens, so one harmful sentence after a dozen harmless ones is diluted
away (and anything past 256 word pieces is cut). ``windows()`` splits a post into at most
``MAX_WINDOWS`` overlapping word windows; the engine judges each and keeps the most unsafe one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from guard.embeddings import FloatArray
from guard.taxonomy import DATA_DIR

HEAD_PATH = DATA_DIR / "cpu_head.npz"
WINDOW_WORDS = 40  # a short post is one window; training rows are 5-35 words
MAX_WINDOWS = 8
MAX_WINDOW_WORDS = 180  # about MiniLM's 256 word-piece limit


def windows(text: str) -> list[str]:
    """Overlapping word windows (half-overlap) covering the post; at most ``MAX_WINDOWS``.

    Windows grow (up to ``MAX_WINDOW_WORDS``) so that eight of them still cover the whole post; past about
    800 words the first seven windows and the last one are judged, and the middle is not seen.
    """
    words = text.split()
    n = len(words)
    if n <= WINDOW_WORDS:
        return [text]
    size = min(max(WINDOW_WORDS, math.ceil(2 * n / (MAX_WINDOWS + 1))), MAX_WINDOW_WORDS)
    stride = max(1, size // 2)
    starts = list(range(0, max(n - size, 0) + 1, stride))
    if starts[-1] + size < n:
        starts.append(n - size)  # the end of the post is always seen when it fits the bound
    if len(starts) > MAX_WINDOWS:
        starts = [*starts[: MAX_WINDOWS - 1], starts[-1]]  # bounded cost; the end stays in view
    return [" ".join(words[s : s + size]) for s in starts]


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
