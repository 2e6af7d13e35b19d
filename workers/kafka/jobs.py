"""A consumed record on its way through the worker's window, from admission to its last broker ack."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from guard.types import Verdict
from workers.kafka.offsets import TP
from workers.media import ImageLease
from workers.pipeline.engine_loop import Failure
from workers.pipeline.records import Outcome, Prepared, Record


@dataclass(eq=False, slots=True)
class Job:
    prepared: Prepared
    epoch: int  # the assignment epoch it was admitted under (``OffsetTracker``): stale after a revoke
    future: Future[Verdict | Failure] | None = None  # its engine request, if it needed the engine
    outcome: Outcome | None = None
    remaining: int = 0  # outputs not yet acknowledged
    lease: ImageLease | None = None  # its images' share of the image budget, until its outcome is built

    def release_images(self) -> None:
        if self.lease is not None:
            self.lease.release()

    @property
    def tp(self) -> TP:
        return tp_of(self.prepared.record)

    @property
    def offset(self) -> int:
        return self.prepared.record.offset


def tp_of(r: Record) -> TP:
    return (r.topic, r.partition)
