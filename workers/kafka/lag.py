"""Consumer lag, for autoscaling, and an idle member's view of its group's lag."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition

from workers.observability.sensors import Sensor

log = structlog.get_logger(__name__)


class LagReporter:
    """Reports each owned partition's lag (end offset minus position; the committed offset where the
    position is unknown, as right after an assignment) to ``sensor.on_lag``, and, for a member that owns
    nothing ``idle_after_s`` after ``restart()`` (the group had its chance to assign it partitions),
    whether the group has lag meanwhile (``sensor.on_idle_with_lag``, ``member_idle_with_lag`` logged):
    e.g. a wedged group that never assigned it anything."""

    def __init__(
        self,
        consumer: Consumer,
        *,
        topic: str,
        group_id: str,
        idle_after_s: float,
        sensor: Sensor,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.group_id = group_id
        self.idle_after_s = idle_after_s
        self.sensor = sensor
        self._clock = clock
        self._since = clock()

    def restart(self) -> None:
        """The member (re)joins its group now: an empty assignment is not idleness before ``idle_after_s``."""
        self._since = self._clock()

    def update(self, parts: list[TopicPartition] | None = None) -> None:
        """Measure now, for ``parts`` (default: the consumer's assignment). A broker that does not answer
        skips this round."""
        try:
            assignment = self.consumer.assignment() if parts is None else parts
            if not assignment:
                if self._clock() - self._since > self.idle_after_s:
                    self._idle_member_lag()
                return
            self.sensor.on_idle_with_lag(False)
            positions = self.consumer.position(assignment)
            unknown = [tp for tp in positions if tp.offset < 0]
            committed = {
                (tp.topic, tp.partition): tp.offset
                for tp in (self.consumer.committed(unknown, timeout=2) if unknown else [])
            }
            for tp in positions:
                _lo, hi = self.consumer.get_watermark_offsets(tp, timeout=2, cached=False)
                pos = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
                self.sensor.on_lag(tp.topic, tp.partition, max(hi - max(pos, 0), 0))
        except KafkaException as exc:
            log.debug("lag_update_failed", error=str(exc))

    def _idle_member_lag(self) -> None:
        """No partitions: is the group behind anyway?"""
        meta = self.consumer.list_topics(self.topic, timeout=2).topics.get(self.topic)
        if meta is None or not meta.partitions:
            return
        tps = [TopicPartition(self.topic, p) for p in meta.partitions]
        lag = 0
        for tp in self.consumer.committed(tps, timeout=2):
            _lo, hi = self.consumer.get_watermark_offsets(tp, timeout=2, cached=False)
            lag += max(hi - max(tp.offset, 0), 0)
        self.sensor.on_idle_with_lag(lag > 0)
        if lag > 0:
            log.warning("member_idle_with_lag", topic=self.topic, group=self.group_id, lag=lag)
