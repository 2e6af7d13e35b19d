"""The pipeline's data: a consumed ``Record`` in, a ``Prepared`` on its way (decoded, fetched, hashed,
looked up, judged), an ``Outcome`` out with exactly the ``Output``s to publish.

Transport-free: the Kafka worker builds ``Record``s from consumed messages and publishes ``Outcome.outputs``;
replay, tests and benchmarks build them from plain lists.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from guard.types import ModerationItem, Verdict
from schemas.events import DeadLetterEvent, ErrorCode, ImageRef, PostEvent, VerdictEvent
from schemas.wire import CachedVerdict, VerdictWire


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


@dataclass(slots=True)
class Prepared:
    """One record on its way through the pipeline; each stage fills in its part."""

    record: Record
    started: float  # monotonic clock when it was taken in (the verdict's latency_ms)
    post: PostEvent | None = None  # decoded and validated
    item: ModerationItem | None = None  # what the engine judges (text, decoded images)
    key: str | None = None  # content hash: the verdict cache key
    cached: CachedVerdict | None = None
    error: tuple[ErrorCode, str, str] | None = None  # its dead letter: code, error class, message
    verdict: Verdict | None = None
    unavailable: str | None = None  # an infrastructure outage (S3) kept it from being prepared: retry later

    @property
    def image_refs(self) -> list[ImageRef]:
        """The refs this post still has to fetch (none once it failed or was fetched)."""
        if self.post is None or self.error is not None or self.item is not None or not self.post.images:
            return []
        return self.post.image_refs

    def drop_images(self) -> None:
        """Let go of the decoded images once the outcome is built (the record may wait for its acks)."""
        if self.item is not None and self.item.images:
            self.item = replace(self.item, images=())

    @property
    def needs_engine(self) -> bool:
        return (
            self.error is None and self.item is not None and self.cached is None and self.unavailable is None
        )


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
