"""Engine doubles for exercising the worker's failure handling (the infrastructure stays real)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from guard.errors import EngineError
from guard.parser import parse_output
from guard.prompts import PromptSet
from guard.types import GuardEngine, ModerationItem, Verdict


class PoisonEngine:
    """Delegates to a real engine but fails any batch containing a post whose text has ``poison``."""

    def __init__(self, inner: GuardEngine, poison: str) -> None:
        self.inner, self.poison = inner, poison
        self.name, self.model_version, self.policy_version = (
            inner.name,
            inner.model_version,
            inner.policy_version,
        )
        self.taxonomy = getattr(inner, "taxonomy", None)
        self.calls: list[int] = []

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        self.calls.append(len(batch))
        if any(self.poison in (it.text or "") for it in batch):
            raise EngineError("CUDA error: device-side assert triggered")
        return self.inner.moderate(batch)

    def close(self) -> None:
        pass


class RawOutputEngine:
    """Parses whatever ``respond`` returns for each item, like a generative backend would."""

    name = "raw-output-test"
    model_version = "test"

    def __init__(self, prompts: PromptSet, respond: Callable[[ModerationItem, int], str]) -> None:
        self.prompts, self.respond = prompts, respond
        self.policy_version = prompts.policy_version
        self.taxonomy = prompts.taxonomy
        self.calls = 0

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        self.calls += 1
        return [parse_output(self.respond(it, self.calls), self.taxonomy) for it in batch]

    def close(self) -> None:
        pass


class GatedEngine:
    """Delegates to a real engine; its first batch is held until ``release`` is set (a GPU stuck on a
    long batch), or for ``hold_s`` at most. ``entered`` is set when that batch arrives."""

    def __init__(self, inner: GuardEngine, hold_s: float = 60.0) -> None:
        self.inner, self.hold_s = inner, hold_s
        self.name, self.model_version, self.policy_version = (
            inner.name,
            inner.model_version,
            inner.policy_version,
        )
        self.taxonomy = getattr(inner, "taxonomy", None)
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls: list[int] = []

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        self.calls.append(len(batch))
        if len(self.calls) == 1:
            self.entered.set()
            self.release.wait(self.hold_s)
        return self.inner.moderate(batch)

    def close(self) -> None:
        pass
