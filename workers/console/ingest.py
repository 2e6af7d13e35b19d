"""Build the review queue from the topics: verdicts, dead letters, alerts and reviews.

A consumer group (``GUARDSTREAM_CONSOLE_GROUP_ID``) reads the four topics; offsets are committed after
the store is written, so a restarted console resumes, and every store write is idempotent (merges by
post id), so a re-delivered record changes nothing. Several console replicas share the partitions.

What enters the queue (``Reason``): abstained verdicts; dead letters of the engine (unparseable output,
failed engine) — the post is decoded from the dead letter's original bytes; verdicts whose ``p_unsafe``
lies in the configured band; verdicts with a novel-risk description; posts of an alerted cluster (every
member the alert names, in either order of alert and verdict).
Verdicts carry no post content, so a queued verdict's post is read back from its source offset.
Reviews (from this console or ``guardstream review``) close items.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from schemas.codec import DecodeError, decode_post
from schemas.events import (
    AlertEvent,
    DeadLetterEvent,
    ErrorCode,
    PostEvent,
    ReviewEvent,
    VerdictEvent,
    modality_of,
)
from workers.console.settings import ConsoleSettings
from workers.console.store import QueueItem, QueueStore, Reason

log = structlog.get_logger(__name__)

# Dead letters a human can settle: the engine saw the post but produced no usable decision. Malformed
# events and unreadable images have no content to judge.
REVIEWABLE_DEAD_LETTERS = frozenset({ErrorCode.ENGINE_OUTPUT_UNPARSEABLE, ErrorCode.ENGINE_FAILED})


def reasons_for(v: VerdictEvent, band: tuple[float, float]) -> list[Reason]:
    out: list[Reason] = []
    # abstained outright, or judged on part of the post only (the CPU engine on a text+image post)
    if v.safe is None or v.abstained_reason:
        out.append(Reason.ABSTAINED)
    if v.parse_error:
        out.append(Reason.DEAD_LETTER)
    p = v.scores.p_unsafe
    if p is not None and v.safe is not None and band[0] <= p <= band[1]:
        out.append(Reason.UNCERTAIN)
    # a described novel risk, or unsafe outside the taxonomy: exactly what the alerts app clusters
    # (workers.alerts.app.describe), so every member of an alerted cluster is an item here
    if v.novel_risk or (v.safe is False and not v.category):
        out.append(Reason.NOVEL_RISK)
    return out


def item_from_verdict(v: VerdictEvent, post: PostEvent | None, reasons: list[Reason]) -> QueueItem:
    return QueueItem(
        post_id=v.post_id,
        author_id=v.author_id,
        modality=v.modality.value,
        text=post.text if post else None,
        images=list(post.images) if post else [],
        created_at=v.post_created_at,
        reasons=reasons,
        safe=v.safe,
        category=v.subcategory or v.category,
        category_name=v.subcategory_name or v.category_name,
        p_unsafe=v.scores.p_unsafe,
        novel_risk=v.novel_risk,
        abstained_reason=v.abstained_reason,
        reasoning=v.reasoning,
        raw_output=v.raw_output,
        engine=v.engine,
        model_version=v.model_version,
        policy_version=v.policy_version,
        decided_at=v.decided_at,
    )


def item_from_dead_letter(d: DeadLetterEvent) -> QueueItem | None:
    if d.error_code not in REVIEWABLE_DEAD_LETTERS:
        return None
    try:
        post = decode_post(d.original_value())
    except DecodeError:
        return None
    return QueueItem(
        post_id=post.post_id,
        author_id=post.author_id,
        modality=modality_of(post.text, bool(post.images)).value,
        text=post.text,
        images=list(post.images),
        created_at=post.created_at,
        reasons=[Reason.DEAD_LETTER],
        dead_letter_code=d.error_code.value,
        dead_letter_message=d.message,
        decided_at=d.failed_at,
    )


class RecordFetcher:
    """Reads single records by (topic, partition, offset) with one long-lived assign-only consumer."""

    def __init__(self, bootstrap: str, extra: dict[str, str] | None = None) -> None:
        from workers.kafka.config import base_config

        self._c = Consumer(
            {
                **base_config(bootstrap, extra),
                "group.id": "guardstream-console-reader-unused",
                "enable.auto.commit": False,
            }
        )

    def get(self, topic: str, partition: int, offset: int, timeout_s: float = 5.0) -> bytes | None:
        self._c.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                m = self._c.poll(0.2)
                if m is None or m.error():
                    continue
                if m.offset() == offset:
                    return m.value()
                if (m.offset() or 0) > offset:
                    return None
            return None
        finally:
            self._c.unassign()

    def close(self) -> None:
        self._c.close()


@dataclass
class IngestStats:
    records: int = 0
    queued: int = 0
    labels: int = 0
    alerts: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class Ingester:
    def __init__(self, settings: ConsoleSettings, store: QueueStore) -> None:
        self.s = settings
        self.store = store
        self.band = (settings.console_band_low, settings.console_band_high)
        self.stats = IngestStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.topics = [
            settings.kafka.verdicts_topic,
            settings.kafka.dlq_topic,
            settings.kafka.alerts_topic,
            settings.kafka.reviews_topic,
        ]

    # ------------------------------------------------------------------ one record
    def handle(self, topic: str, value: bytes, fetch_post: Any) -> None:
        s = self.s
        self.stats.records += 1
        try:
            if topic == s.kafka.verdicts_topic:
                v = VerdictEvent.model_validate_json(value)
                reasons = reasons_for(v, self.band)
                # nothing to review, unless the post is queued already (a re-decision keeps its reasons)
                # or an alerted cluster named it before its verdict arrived
                if not reasons and self.store.get(v.post_id) is None and not self.store.pending(v.post_id):
                    return
                post = None
                raw = fetch_post(v.source_topic, v.source_partition, v.source_offset)
                if raw is not None:
                    try:
                        post = decode_post(raw)
                    except DecodeError:
                        post = None
                    if post is not None and post.post_id != v.post_id:
                        post = None
                self._queued(self.store.upsert(item_from_verdict(v, post, reasons)), reasons)
            elif topic == s.kafka.dlq_topic:
                item = item_from_dead_letter(DeadLetterEvent.model_validate_json(value))
                if item is not None:
                    self._queued(self.store.upsert(item), item.reasons)
            elif topic == s.kafka.alerts_topic:
                a = AlertEvent.model_validate_json(value)
                self.store.record_alert(a)
                # Every member the alert names (``member_ids``; only ``examples`` in alerts from before
                # that field), not a guess from the descriptions: the alerts app alone knows which
                # cluster a post joined. This is correct in either arrival order because every member is
                # a novel-risk verdict (what the alerts app clusters is what ``reasons_for`` queues as
                # NOVEL_RISK): a verdict ingested before the alert is an item already and is tagged now;
                # one ingested after finds the ``pending:`` mark left here and is tagged on upsert.
                # Tagging only novel-risk verdicts already in the store would miss the verdicts that
                # arrive after their alert, and could not tell which cluster a verdict belongs to.
                members = list(dict.fromkeys([*(a.member_ids or []), *a.examples]))
                self.store.add_cluster_members(a.cluster_id, members)
                self.stats.alerts += 1
            elif topic == s.kafka.reviews_topic and self.store.mark_labelled(
                ReviewEvent.model_validate_json(value)
            ):
                self.stats.labels += 1
        except ValueError as exc:  # an event that does not validate: skip it, say so once per record
            log.warning("console_ingest_skipped", topic=topic, error=str(exc)[:200])

    def _queued(self, item: QueueItem, reasons: Iterable[Reason]) -> None:
        self.stats.queued += 1
        for r in reasons:
            self.stats.by_reason[r.value] = self.stats.by_reason.get(r.value, 0) + 1

    # ------------------------------------------------------------------ the loop
    def _consumer(self) -> Consumer:
        from workers.kafka.config import consumer_config

        # the worker's consumer settings (kafka_extra included) under the console's own group
        return Consumer(
            consumer_config(self.s.kafka.model_copy(update={"group_id": self.s.console_group_id}))
        )

    def run(self) -> None:
        from workers.kafka.admin import create_topics

        create_topics(
            self.s.kafka.bootstrap_servers,
            {self.s.kafka.alerts_topic: 1, self.s.kafka.reviews_topic: 1},
            extra=self.s.kafka.extra,
        )
        consumer = self._consumer()
        fetcher = RecordFetcher(self.s.kafka.bootstrap_servers, self.s.kafka.extra)
        consumer.subscribe(self.topics)
        log.info("console_ingest_started", topics=self.topics, group=self.s.console_group_id)
        try:
            while not self._stop.is_set():
                try:
                    self._step(consumer, fetcher)
                except (KafkaException, redis.RedisError) as exc:
                    # nothing of this batch is committed: it is read again, and store writes are merges
                    log.warning("console_ingest_retrying", error=str(exc)[:300])
                    self._stop.wait(1.0)
        finally:
            fetcher.close()
            consumer.close()

    def _step(self, consumer: Consumer, fetcher: RecordFetcher) -> None:
        msgs: list[Message] = consumer.consume(500, 0.5)
        done: dict[tuple[str, int], int] = {}
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("console_ingest_error", error=str(err))
                continue
            topic, value, part, off = m.topic(), m.value(), m.partition(), m.offset()
            if topic is None or part is None or off is None:
                continue
            if value is not None:
                self.handle(topic, value, fetcher.get)
            done[(topic, part)] = off + 1
        if done:  # after the store writes: a restarted console resumes here
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in done.items()], asynchronous=False
            )

    def start(self) -> Ingester:
        self._thread = threading.Thread(target=self.run, name="console-ingest", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
