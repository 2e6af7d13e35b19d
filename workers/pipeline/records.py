"""The pipeline's data: a consumed ``Record`` in, an ``Outcome`` out with exactly the ``Output``s to publish.

Transport-free: the Kafka worker builds ``Record``s from consumed messages and publishes ``Outcome.outputs``;
replay, tests and benchmarks build them from plain lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from schemas.events import DeadLetterEvent, VerdictEvent
from schemas.wire import VerdictWire


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes


class OutcomeKind(StrEnum):
    """What one consumed record became. A ``StrEnum`` so that it compares, logs and serialises as the same
    bare strings as before (``"verdict"``, ``"dead_letter"``)."""

    VERDICT = "verdict"
    DEAD_LETTER = "dead_letter"


@dataclass(slots=True)
class Outcome:
    """Everything to publish for one consumed record (exactly one verdict or one dead letter)."""

    record: Record
    kind: OutcomeKind
    post_id: str | None
    outputs: list[Output]
    verdict: VerdictWire | None = None
    dead_letter: DeadLetterEvent | None = None

    @property
    def event(self) -> VerdictEvent | DeadLetterEvent:
        """The published event as its schema model (validated from the published bytes: off the hot path,
        for replay, tests and benchmarks)."""
        if self.dead_letter is not None:
            return self.dead_letter
        return VerdictEvent.model_validate_json(self.outputs[0].value)
