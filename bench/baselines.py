"""The baselines a worker is measured against, on the same broker and posts in the same run.

- ``run_raw(s, n, label)``: a raw confluent-kafka loop — consume a batch, produce it to the output topic,
  wait for the acks, commit. What Kafka itself costs per post on this machine.
- ``run_raw(..., work=minimal_work(s))`` (row 1a): the same loop doing only the per-post work no
  moderation worker can skip, with the worker's own parts — the ceiling a worker could reach here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from confluent_kafka import Consumer, Message, Producer, TopicPartition

from bench.harness import Run, progress
from schemas.codec import decode_post
from schemas.wire import ScoresWire, VerdictWire, encode
from workers.cache import ContentKeyer, VerdictCache
from workers.settings import Settings

Work = Callable[[list[Message]], list[tuple[bytes, bytes | None]]]


def forward(msgs: list[Message]) -> list[tuple[bytes, bytes | None]]:
    """The raw baseline's work: none, each record's bytes go out as they came in."""
    return [(m.value() or b"", m.key()) for m in msgs]


def minimal_work(s: Settings) -> Work:
    """The per-post work no moderation worker can skip, with the worker's own parts and nothing else:
    validate the post (the same pydantic decoder), hash its content, one MGET per batch, and write a
    verdict JSON (the same msgspec encoder). No pipelining, cache write, metrics or bookkeeping."""
    keyer = ContentKeyer(engine="bench-minimal", model_version="none", policy="bench")
    cache = VerdictCache(s.cache.url, s.cache.ttl_s)

    def work(msgs: list[Message]) -> list[tuple[bytes, bytes | None]]:
        posts = [decode_post(m.value()) for m in msgs]
        keys = [keyer(p.modality.value, p.text) for p in posts]
        cache.get_many(keys)
        now = datetime.now(UTC)
        return [
            (
                encode(
                    VerdictWire(
                        post_id=p.post_id,
                        author_id=p.author_id,
                        modality=p.modality,
                        safe=True,
                        scores=ScoresWire(p_unsafe=0.0),
                        engine="bench-minimal",
                        model_version="none",
                        policy_version="bench",
                        content_hash=k,
                        cache_hit=False,
                        latency_ms=0.0,
                        source_topic=s.kafka.posts_topic,
                        source_partition=m.partition() or 0,
                        source_offset=m.offset() or 0,
                        post_created_at=p.created_at,
                        decided_at=now,
                    )
                ),
                p.post_id.encode(),
            )
            for m, p, k in zip(msgs, posts, keys, strict=True)
        ]

    return work


def run_raw(s: Settings, n: int, label: str, work: Work = forward, group: str = "raw") -> Run:
    """The baseline loop: consume a batch, produce ``work(batch)`` to the output topic, wait for the acks,
    commit."""
    c = Consumer(
        {
            "bootstrap.servers": s.kafka.bootstrap_servers,
            "group.id": f"{s.kafka.group_id}-{group}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "log.connection.close": False,
        }
    )
    p = Producer(
        {
            "bootstrap.servers": s.kafka.bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "log.connection.close": False,
        }
    )
    c.subscribe([s.kafka.posts_topic])
    done = 0
    marks: list[tuple[float, int]] = []
    with progress() as prog:
        task = prog.add_task(label, total=n)
        while done < n:
            msgs = [m for m in c.consume(s.max_batch_size, 0.05) if not m.error()]
            if not msgs:
                continue
            for value, key in work(msgs):
                p.produce(s.kafka.verdicts_topic, value, key)
            p.flush(30)
            offs: dict[int, int] = {}
            for m in msgs:
                offs[m.partition() or 0] = max(offs.get(m.partition() or 0, 0), (m.offset() or 0) + 1)
            c.commit(
                offsets=[TopicPartition(s.kafka.posts_topic, k, v) for k, v in offs.items()],
                asynchronous=False,
            )
            done += len(msgs)
            marks.append((time.perf_counter(), len(msgs)))
            prog.advance(task, len(msgs))
    c.close()
    return Run(sum(k for _, k in marks[1:]), marks[-1][0] - marks[0][0], [])
