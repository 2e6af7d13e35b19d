"""Engines used only by the benchmarks."""

from __future__ import annotations

import threading
import time

from guard.types import ModerationItem, Verdict


class ZeroCostEngine:
    """Answers instantly (every post safe) so a benchmark measures the worker, not a model."""

    name = "bench-zero-cost"
    model_version = "none"
    policy_version = "bench"

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        return [Verdict(safe=True, p_unsafe=0.0) for _ in batch]

    def close(self) -> None:
        pass


class SimulatedGpuEngine:
    """Models a GPU: ``fixed_s`` per batch plus ``per_item_s`` per item, spent sleeping (the CPU is free,
    as it is while a real GPU works). Records every batch size it was given."""

    name = "bench-simulated-gpu"
    model_version = "sim"
    policy_version = "bench"

    def __init__(self, fixed_s: float, per_item_s: float) -> None:
        self.fixed_s, self.per_item_s = fixed_s, per_item_s
        self.batches: list[int] = []
        self.busy_s = 0.0
        self._lock = threading.Lock()

    def capacity(self, max_batch: int) -> float:
        return max_batch / (self.fixed_s + self.per_item_s * max_batch)

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        t = self.fixed_s + self.per_item_s * len(batch)
        time.sleep(t)
        with self._lock:
            self.batches.append(len(batch))
            self.busy_s += t
        return [Verdict(safe=True, p_unsafe=0.0) for _ in batch]

    def close(self) -> None:
        pass
