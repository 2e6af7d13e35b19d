"""Engines used only by the benchmarks."""

from __future__ import annotations

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
