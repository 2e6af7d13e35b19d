"""Small helpers to produce a feed and read a topic to its end (no consumer group involved)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from confluent_kafka import Consumer, Producer, TopicPartition

from workers.kafka.config import reader_config, writer_config


def produce_all(
    bootstrap: str,
    topic: str,
    items: Iterable[tuple[bytes | str | None, bytes]],
    extra: Mapping[str, str] | None = None,
) -> int:
    p = Producer(writer_config(bootstrap, extra))
    errors: list[str] = []
    n = 0
    for key, value in items:
        p.produce(topic, value, key, on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
        n += 1
        p.poll(0)
    left = p.flush(30)
    if left or errors:
        raise RuntimeError(f"produce to {topic} failed: {left} unacknowledged, errors={errors[:3]}")
    return n


@dataclass(frozen=True, slots=True)
class TopicRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


def read_topic(
    bootstrap: str,
    topic: str,
    timeout_s: float = 15.0,
    read_committed: bool = True,
    extra: Mapping[str, str] | None = None,
) -> list[bytes]:
    """Every message value currently in ``topic`` (all partitions, from the beginning to the end)."""
    records = read_records(bootstrap, topic, timeout_s, read_committed, extra)
    return [r.value for r in records if r.value is not None]


def read_records(
    bootstrap: str,
    topic: str,
    timeout_s: float = 15.0,
    read_committed: bool = True,
    extra: Mapping[str, str] | None = None,
) -> list[TopicRecord]:
    """Read ``topic`` to its end without a consumer group.

    Tansu (memory storage) reports a partition's high watermark as the *base offset of the last record
    batch* + 1, not the last record's offset + 1, so the watermark alone under-counts. A partition is
    finished once the position passed that watermark (we hold part of the last batch) and a further
    consume returns nothing (the rest of that batch, fetched with it, has been delivered too).
    """
    c = Consumer(reader_config(bootstrap, extra, read_committed=read_committed))
    try:
        md = c.list_topics(topic, timeout=timeout_s)
        parts = sorted(md.topics[topic].partitions) if topic in md.topics else []
        ends: dict[int, int] = {}
        for p in parts:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s, cached=False)
            if hi > lo:
                ends[p] = hi
        if not ends:
            return []
        c.assign([TopicPartition(topic, p, 0) for p in ends])
        out: list[TopicRecord] = []
        reached: dict[int, int] = {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msgs = c.consume(500, 0.2)
            for m in msgs:
                if m.error():
                    continue
                part, off = m.partition(), m.offset()
                assert part is not None and off is not None
                ts_type, ts = m.timestamp()
                out.append(TopicRecord(part, off, m.key(), m.value(), ts if ts_type else None))
                reached[part] = max(reached.get(part, -1), off + 1)
            if not msgs and all(reached.get(p, 0) >= hi for p, hi in ends.items()):
                break
        return out
    finally:
        c.close()


def end_offsets(
    bootstrap: str, topic: str, timeout_s: float = 15.0, extra: Mapping[str, str] | None = None
) -> dict[int, int]:
    """The true next offset per partition (read, not trusted from the watermark; see ``read_records``)."""
    ends: dict[int, int] = {}
    for r in read_records(bootstrap, topic, timeout_s, read_committed=False, extra=extra):
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    return ends
