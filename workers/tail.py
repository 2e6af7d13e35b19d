"""Follow the output topics (``guardstream tail``): verdicts, dead letters, alerts.

A reader by assignment (no consumer group: tailing never moves the worker's offsets or joins a group),
built by ``workers.kafka.config.reader_config`` so ``kafka_extra`` (TLS/SASL) applies. It reads
committed records only, as a downstream consumer of an exactly-once worker would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

from workers.kafka.config import reader_config
from workers.settings import Settings

KINDS = ("verdicts", "dead-letters", "alerts")


class TailError(RuntimeError):
    """A topic to follow that the broker does not have (names it and the fix)."""


def topic_of(s: Settings, kind: str) -> str:
    k = s.kafka
    return {"verdicts": k.verdicts_topic, "dead-letters": k.dlq_topic, "alerts": k.alerts_topic}[kind]


@dataclass(frozen=True, slots=True)
class TailRecord:
    kind: str
    topic: str
    partition: int
    offset: int
    raw: bytes
    value: dict[str, Any] | None  # None when the record is not a JSON object


def follow(
    s: Settings,
    kinds: list[str],
    *,
    from_beginning: bool = False,
    limit: int | None = None,
    idle_timeout_s: float | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[list[TailRecord]]:
    """Yield records in polled batches until ``limit`` records, ``idle_timeout_s`` without one, or
    ``stop()``. Starts at the end of each partition unless ``from_beginning``."""
    topics = {topic_of(s, k): k for k in kinds}
    c = Consumer(reader_config(s.kafka.bootstrap_servers, s.kafka.extra, group_id="guardstream-tail-unused"))
    try:
        md = c.list_topics(timeout=10)
        missing = [t for t in topics if t not in md.topics]
        if missing:
            raise TailError(
                f"topic(s) {missing} do not exist on {s.kafka.bootstrap_servers}: create them with "
                "`guardstream topics create` or set GUARDSTREAM_*_TOPIC"
            )
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        c.assign([TopicPartition(t, p, start) for t in topics for p in sorted(md.topics[t].partitions)])
        seen = 0
        last = time.monotonic()
        while not stop():
            msgs = c.consume(500, 0.5)
            batch: list[TailRecord] = []
            for m in msgs:
                if m.error() or m.value() is None:
                    continue
                raw = m.value()
                topic, part, off = m.topic(), m.partition(), m.offset()
                assert raw is not None and topic is not None and part is not None and off is not None
                batch.append(TailRecord(topics[topic], topic, part, off, raw, _decode(raw)))
                if limit is not None and seen + len(batch) >= limit:
                    break
            if batch:
                seen += len(batch)
                last = time.monotonic()
                yield batch
            if limit is not None and seen >= limit:
                return
            if idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                return
    finally:
        c.close()


def _decode(raw: bytes) -> dict[str, Any] | None:
    try:
        v = json.loads(raw)
    except ValueError:
        return None
    return v if isinstance(v, dict) else None
