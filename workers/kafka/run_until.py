"""When a run ends, other than by ``stop()`` (SIGTERM): the stop conditions of ``KafkaWorker.run``
(quix-streams' ``runtracker``).

- ``until_drained`` (``guardstream worker --until-drained``, the demo, backfills, the tests): every
  assigned partition is consumed *and committed* to the end offset its last end-of-partition event
  reported, with nothing in flight.
- ``idle_timeout_s``: nothing was consumed or published for that long.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from workers.kafka.offsets import TP


class PartitionEnds:
    """The end offset of each partition as last reported by an end-of-partition event.

    EOF offsets, not watermarks: Tansu's high watermark is the last record *batch's* base offset + 1 and
    cannot be compared with positions. librdkafka reports an end offset once, so it is kept across
    rebalances, and dropped when records arrive past it; after a rebalance a partition's position is
    unknown until it delivers again, and the committed offset answers instead.
    """

    def __init__(self) -> None:
        self._eof: dict[TP, int] = {}

    def saw_end(self, m: Message) -> None:
        """``m`` is a ``_PARTITION_EOF`` event."""
        self._eof[(m.topic() or "", m.partition() or 0)] = m.offset() or 0

    def saw_record(self, tp: TP, offset: int) -> None:
        end = self._eof.get(tp)
        if end is not None and offset >= end:
            del self._eof[tp]

    def reached(self, consumer: Consumer) -> bool:
        """True when the group owns partitions and each one is consumed and committed up to its end.
        Called only with nothing in flight."""
        assignment = consumer.assignment()
        if not assignment:
            return False
        ends = [self._eof.get((tp.topic, tp.partition)) for tp in assignment]
        if any(e is None for e in ends):
            return False
        try:
            positions = consumer.position(assignment)
            unknown = [tp for tp in positions if tp.offset < 0]
            if unknown:
                # no commit yet: the group starts at the beginning (auto.offset.reset=earliest)
                done = {(t.topic, t.partition): max(t.offset, 0) for t in consumer.committed(unknown, 5)}
                positions = [
                    TopicPartition(tp.topic, tp.partition, done.get((tp.topic, tp.partition), -1))
                    if tp.offset < 0
                    else tp
                    for tp in positions
                ]
        except KafkaException:  # broker unreachable: not known to be at the end
            return False
        return all(tp.offset >= (end or 0) for tp, end in zip(positions, ends, strict=True))


def is_partition_end(m: Message) -> bool:
    err = m.error()
    return err is not None and err.code() == KafkaError._PARTITION_EOF


@dataclass
class RunUntil:
    """A run's stop conditions and the progress they are measured against."""

    drained: bool = False
    idle_timeout_s: float | None = None
    ends: PartitionEnds = field(default_factory=PartitionEnds)
    _last_progress: float = field(default_factory=time.monotonic)

    def progressed(self) -> None:
        self._last_progress = time.monotonic()

    def idle_too_long(self) -> bool:
        limit = self.idle_timeout_s
        return limit is not None and time.monotonic() - self._last_progress > limit
