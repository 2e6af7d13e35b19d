"""The Kafka side of the streaming worker.

One path for every engine. The main thread owns the confluent-kafka consumer and producer; an asyncio
loop on the engine thread (``workers.pipeline.engine_loop``) awaits ``StreamingEngine.judge`` once per cache
miss,
up to ``MAX_IN_FLIGHT`` outstanding, and each finished request comes back to the main thread through a
queue and is published the moment it returns. Cache hits and dead letters are published as soon as they
are prepared: they never wait behind engine work.

Offsets (``workers.kafka.offsets``): each record enters its partition's ``OffsetTracker`` when consumed and is
complete when the broker acknowledged every one of its outputs (verdict, novel-risk copy or dead letter).
Every ``COMMIT_INTERVAL_MS`` (and on revoke and shutdown) each partition is committed at its watermark,
the first incomplete offset: never past a record whose outputs might not be on the broker. A crash
re-delivers from the watermark; records above it that had completed are published again (identical
decisions: content-hash cache, deterministic engines).

Backpressure: when ``MAX_IN_FLIGHT`` requests are outstanding the worker stops consuming and waits for
completions; if that lasts ``PAUSE_AFTER_S`` the partitions are paused and the consumer keeps being
served (group membership, rebalances) without reading ahead, and they are resumed when room frees up.
The same holds for image memory (``INFLIGHT_IMAGE_BYTES``, ``workers.media.ImageBudget``): each image post
reserves its worst case before it is fetched and holds the bytes of its decoded images until its outcome
is built (or it is dropped by a revoke or shutdown); an image post that does not fit waits, decoded but
unfetched, and admission stops as for a full window. Text posts already consumed go on.

Rebalances: on revoke the worker waits up to ``REVOKE_TIMEOUT_S`` for the revoked partitions' requests,
publishes what finished, commits their watermarks, and drops the rest uncommitted (cancelled in the
engine; a completion arriving later carries a stale assignment epoch and is ignored).

Exactly-once: a commit interval's outputs are kept in memory; at its end the worker stops admitting,
drains its in-flight requests, and produces them in one short transaction with the consumed offsets (a
transaction held open for the whole interval is what a kill -9 would nearly always interrupt).

Outages are not dead letters: a dead engine (``EngineDeadError``) or an unavailable S3
(``MediaUnavailable``) stops admission, keeps the affected records uncommitted, retries them with
backoff, marks the worker not ready, and exits (code 3) past ``ENGINE_DEADLINE_S``/``MEDIA_DEADLINE_S``.
"""

from __future__ import annotations

import functools
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from guard.errors import EngineDeadError
from guard.types import StreamingEngine, Verdict
from schemas.errors import EXIT_OUTAGE, FatalError
from schemas.events import ErrorCode
from workers.kafka.config import consumer_config, producer_config
from workers.kafka.lag import LagReporter
from workers.kafka.offsets import TP, Offsets
from workers.media import ImageBudget, ImageLease
from workers.observability.sensors import Sensor
from workers.pipeline.engine_loop import EngineLoop, Failure
from workers.pipeline.moderator import Moderator, Prepared, shrink_output
from workers.pipeline.records import Outcome, OutcomeKind, Output, Record
from workers.settings import DeliveryMode, Settings

log = structlog.get_logger(__name__)


class PublishError(FatalError):
    """The broker did not acknowledge an output: nothing at or past that record is committed (exit 3)."""

    exit_code = EXIT_OUTAGE


class Unavailable(FatalError):
    """A dependency stayed unavailable past its deadline: the worker exits (code 3). Nothing is lost:
    uncommitted posts are re-delivered to whoever consumes the partitions next."""

    exit_code = EXIT_OUTAGE


class BrokerUnavailable(Unavailable):
    """No broker answered for longer than ``broker_deadline_s``."""


class EngineUnavailable(Unavailable):
    """The engine was dead (``EngineDeadError``) for longer than ``engine_deadline_s``."""


class MediaOutage(Unavailable):
    """S3 was unavailable (``MediaUnavailable``) for longer than ``media_deadline_s``."""


# librdkafka errors that mean "cannot reach the cluster" (it reconnects by itself; we only time it)
_UNREACHABLE = {KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE}
_COORDINATOR_AWAY = _UNREACHABLE | {
    KafkaError._WAIT_COORD,
    KafkaError._TIMED_OUT,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
}
# the group moved on (rebalance) under a commit: the partitions may be someone else's now
_GENERATION_LOST = {
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError._ASSIGNMENT_LOST,
}
_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE}
_MAX_BACKOFF_S = 30.0


@dataclass
class RunStats:
    consumed: int = 0  # records whose outcome was published
    verdicts: int = 0
    dead_letters: int = 0
    batches: int = 0  # groups of outcomes published together
    commits: int = 0
    outcomes: list[Outcome] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class Job:
    """One consumed record on its way through the window."""

    prepared: Prepared
    epoch: int
    future: Future[Verdict | Failure] | None = None
    outcome: Outcome | None = None
    remaining: int = 0  # outputs not yet acknowledged
    lease: ImageLease | None = None  # its images' share of the image budget, until its outcome is built

    def release_images(self) -> None:
        if self.lease is not None:
            self.lease.release()

    @property
    def tp(self) -> TP:
        r = self.prepared.record
        return (r.topic, r.partition)


@dataclass(slots=True)
class _Outage:
    """An infrastructure dependency that is down: since when, and when to try again."""

    name: str
    deadline_s: float
    backoff_s: float
    since: float | None = None
    next_try: float = 0.0
    delay: float = 0.0

    def down(self, now: float, error: str) -> None:
        """A request or fetch failed for want of the dependency (many may in one round: only the first
        starts the outage; the backoff grows once per retry round, in ``retried``)."""
        if self.since is None:
            self.since, self.delay = now, self.backoff_s
            self.next_try = now + self.delay
            log.warning(f"{self.name}_unavailable_retrying", error=error[:300], deadline_s=self.deadline_s)

    def retried(self, now: float) -> None:
        self.delay = min(self.delay * 2, _MAX_BACKOFF_S)
        self.next_try = now + self.delay

    def up(self, now: float) -> None:
        if self.since is not None:
            log.info(f"{self.name}_available_again", down_for_s=round(now - self.since, 1))
        self.since = None

    def overdue(self, now: float) -> bool:
        return self.since is not None and now - self.since > self.deadline_s


class KafkaWorker:
    def __init__(
        self,
        settings: Settings,
        moderator: Moderator,
        engine: StreamingEngine,
        *,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        sensor: Sensor | None = None,
    ) -> None:
        """``on_event(name, details)`` is told about "assigned", "paused", "revoking", "revoked" and
        "broker_down" (a seam for tests and embedding; called on the main thread). ``sensor`` gets the
        loop's events (liveness, readiness, window, commits, broker, lag) and the engine thread's; default:
        the moderator's (itself the process-wide Prometheus sensor unless it was given one)."""
        self.s = settings
        self.moderator = moderator
        self.engine = engine
        self._on_event = on_event
        self.sensor = sensor if sensor is not None else moderator.sensor
        self.max_in_flight = settings.engine_config.max_in_flight or max(1, engine.max_in_flight)
        self._broker_down_since: float | None = None
        self._next_probe = 0.0
        self.consumer = Consumer({**consumer_config(settings.kafka), "error_cb": self._on_kafka_error})
        self.transactional = settings.kafka.delivery is DeliveryMode.EXACTLY_ONCE
        pcfg = {**producer_config(settings.kafka), "error_cb": self._on_kafka_error}
        if self.transactional:
            pcfg["transactional.id"] = (
                settings.kafka.transactional_id or f"{settings.kafka.group_id}-{socket.gethostname()}"
            )
        self.producer = Producer(pcfg)
        if self.transactional:
            # fences any zombie with the same id and aborts its open transaction
            self.producer.init_transactions(settings.kafka.produce_timeout_s)
        # exactly-once: outputs of the current interval, produced only inside the short transaction at
        # its end (a transaction open for the whole interval would be what a kill -9 nearly always hits)
        self._txn_buffer: list[tuple[Job, Output]] = []
        self._engine = EngineLoop(engine, settings, sensor=self.sensor)
        self._done: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._in_engine: set[Job] = set()
        self._engine_held: list[Job] = []  # refused by a dead engine: re-submitted after backoff
        self._media_held: list[tuple[int, Record]] = []  # S3 unavailable: prepared again after backoff
        # Normalised image bytes of every admitted post, from decode to outcome (INFLIGHT_IMAGE_BYTES):
        # decoded image posts that do not fit wait here, unfetched, and admission stops (backpressure)
        self.images = ImageBudget.for_target(settings.media.inflight_image_bytes, settings.target_pixels)
        self._budget_held: list[tuple[int, Prepared]] = []
        self._engine_outage = _Outage("engine", settings.engine_deadline_s, settings.outage_backoff_s)
        self._media_outage = _Outage("media", settings.media.deadline_s, settings.outage_backoff_s)
        self.offsets = Offsets()
        self._failures: list[str] = []  # delivery errors (served on the main thread by poll/flush)
        self._too_large: list[tuple[Job, Output]] = []
        self._since_commit: list[Outcome] = []
        self._paused = False
        self._full_since: float | None = None
        self._draining = False  # exactly-once: stop admitting until the transaction is committed
        self._closing = False
        self._last_commit = time.monotonic()
        self.lag = LagReporter(
            self.consumer,
            topic=settings.kafka.posts_topic,
            group_id=settings.kafka.group_id,
            # not idle before the group had a chance to assign us something (a session timeout)
            idle_after_s=settings.kafka.session_timeout_ms / 1000.0,
            sensor=self.sensor,
        )
        # end offset of each partition as last reported by an end-of-partition event (librdkafka reports
        # an end offset once: it is kept across rebalances, and dropped when records arrive past it)
        self._eof: dict[tuple[str, int], int] = {}
        self._stop = threading.Event()
        self._on_batch: Callable[[list[Outcome]], None] | None = None
        self.stats = RunStats()
        self.keep_outcomes = False

    @property
    def waiting_for_image_budget(self) -> int:
        """Decoded image posts waiting, unfetched, for room in the image budget (admission is stopped)."""
        return len(self._budget_held)

    # ------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _event(self, name: str, **details: Any) -> None:
        if self._on_event is not None:
            self._on_event(name, details)

    def _on_kafka_error(self, err: KafkaError) -> None:
        """librdkafka's client-level errors (served on the main thread, from consume/poll/flush)."""
        if err.code() in _UNREACHABLE:
            if self._broker_down_since is None:
                self._broker_down_since = time.monotonic()
                log.warning(
                    "broker_unreachable_retrying",
                    error=err.str(),
                    deadline_s=self.s.kafka.broker_deadline_s,
                    bootstrap=self.s.kafka.bootstrap_servers,
                )
                self._event("broker_down")
        else:
            log.warning("kafka_client_error", error=err.str(), code=err.code())

    def _check_broker(self) -> None:
        """While the broker is marked unreachable, probe it (at most once a second); give up past the
        deadline. A positive probe is needed because an idle consumer gets no other sign of recovery."""
        since = self._broker_down_since
        now = time.monotonic()
        if since is None or now < self._next_probe:
            return
        self._next_probe = now + 1.0
        try:
            self.consumer.list_topics(self.s.kafka.posts_topic, timeout=1.0)
        except KafkaException as exc:
            down_for = time.monotonic() - since
            self.sensor.on_broker_down(down_for)
            if down_for > self.s.kafka.broker_deadline_s:
                log.error(
                    "broker_unavailable_giving_up",
                    down_for_s=round(down_for, 1),
                    deadline_s=self.s.kafka.broker_deadline_s,
                    bootstrap=self.s.kafka.bootstrap_servers,
                    error=str(exc),
                )
                raise BrokerUnavailable(
                    f"no broker at {self.s.kafka.bootstrap_servers} answered for {down_for:.0f}s "
                    f"(deadline {self.s.kafka.broker_deadline_s:g}s, GUARDSTREAM_BROKER_DEADLINE_S)"
                ) from None
            return
        log.info("broker_reachable_again", down_for_s=round(time.monotonic() - since, 1))
        self.sensor.on_broker_down(0)
        self._broker_down_since = None

    def readiness(self) -> tuple[bool, str]:
        """Ready: partitions assigned and engine and S3 available; else False and why (``/readyz``)."""
        if self._engine_outage.since is not None:
            return False, "engine unavailable"
        if self._media_outage.since is not None:
            return False, "media (S3) unavailable"
        if not self.offsets.parts:
            return False, "idle: no partitions assigned"
        return True, "ready"

    def _update_ready(self) -> None:
        self.sensor.on_ready(*self.readiness())

    # ------------------------------------------------------------ rebalance
    def _on_assign(self, c: Consumer, parts: list[TopicPartition]) -> None:
        self.offsets.assign((p.topic, p.partition) for p in parts)
        # librdkafka keeps a partition's pause flag across revoke/assign: set it to what we want now
        if self._paused:
            c.pause(parts)
        else:
            c.resume(parts)
        self._update_ready()
        log.info("partitions_assigned", partitions=sorted(p.partition for p in parts))
        self._event("assigned", partitions={(p.topic, p.partition) for p in parts})

    def _on_revoke(self, _c: Consumer, parts: list[TopicPartition]) -> None:
        lost = {(p.topic, p.partition) for p in parts}
        log.info("partitions_revoked", partitions=sorted(p for _t, p in lost), in_engine=len(self._in_engine))
        self._event("revoking", partitions=lost)
        if self._closing:  # shutdown already committed what it could; an error path must commit nothing
            self._drop(lost)
            return
        if self.transactional:
            self._revoke_transactional(lost)
        else:
            # finish what the revoked partitions have in flight while we still own them (bounded)
            self._wait_in_flight(lambda j: j.tp in lost, self.s.revoke_timeout_s)
            self._flush_acks()
            self._commit(only=lost)
        self._drop(lost)
        self._update_ready()
        self._event("revoked", partitions=lost)

    def _revoke_transactional(self, lost: set[TP]) -> None:
        """Exactly-once: the open transaction holds outputs of every partition. Finish the in-flight work
        (bounded) and commit it; if it does not finish in time, abort it and rewind every partition we
        keep to its committed offset (their aborted outputs must be produced again)."""
        self._wait_in_flight(lambda _j: True, self.s.revoke_timeout_s)
        if not self._in_engine:
            self._commit_transaction()
            return
        log.warning("revoke_timeout_aborting_transaction", in_engine=len(self._in_engine))
        self._abort_transaction()
        kept = [tp for tp in self.offsets.parts if tp not in lost]
        self._drop(set(self.offsets.parts))
        self._rewind(kept)

    def _drop(self, tps: set[TP]) -> None:
        """Forget partitions: cancel their requests (a late completion is fenced by epoch anyway)."""
        for job in [j for j in self._in_engine if j.tp in tps]:
            if job.future is not None:
                job.future.cancel()
        for job in self._engine_held:
            if job.tp in tps:
                job.release_images()
        self._engine_held = [j for j in self._engine_held if j.tp not in tps]
        self._media_held = [(e, r) for e, r in self._media_held if (r.topic, r.partition) not in tps]
        self._budget_held = [(e, p) for e, p in self._budget_held if _tp(p.record) not in tps]
        self.offsets.revoke(tps)

    def _rewind(self, tps: list[TP]) -> None:
        if not tps:
            return
        try:
            done = self.consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=10)
        except KafkaException as exc:
            raise PublishError(f"cannot rewind after an aborted transaction: {exc}") from exc
        self.offsets.assign(tps)
        for tp in done:
            self.consumer.seek(
                TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
            )

    # ------------------------------------------------------------ main loop
    def run(
        self,
        *,
        until_drained: bool = False,
        idle_timeout_s: float | None = None,
        on_batch: Callable[[list[Outcome]], None] | None = None,
    ) -> RunStats:
        """Run until ``stop()`` (SIGTERM), or until every assigned partition is consumed to its end.
        ``on_batch`` is called after each commit with the outcomes published since the previous one."""
        self.consumer.subscribe(
            [self.s.kafka.posts_topic], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        self.lag.restart()
        self._on_batch = on_batch
        last_progress = time.monotonic()
        last_lag = 0.0
        self.sensor.on_max_in_flight(self.max_in_flight)
        log.info("worker_started", engine=self.engine.name, max_in_flight=self.max_in_flight)
        try:
            while not self._stop.is_set():
                self.sensor.on_beat()
                self._check_broker()
                now = time.monotonic()
                if now - last_lag > self.s.lag_interval_s:
                    self.lag.update()
                    last_lag = now
                if self._step():
                    last_progress = time.monotonic()
                elif until_drained and self._quiet() and self._at_end():
                    if self._broker_down_since is not None:  # it answered _at_end: say it is back
                        self._next_probe = 0.0
                        self._check_broker()
                        if self._broker_down_since is not None:
                            # not known to be drained while the broker does not answer a probe: go on
                            # (the broker deadline still applies)
                            continue
                    break
                if idle_timeout_s is not None and time.monotonic() - last_progress > idle_timeout_s:
                    log.info("idle_timeout", seconds=idle_timeout_s)
                    break
            self._shutdown()
        finally:
            self.sensor.on_ready(False, "stopped")
            self.close()
        return self.stats

    def _step(self) -> bool:
        """One turn of the loop; True when records were consumed or outcomes published."""
        progressed = self._collect_done(0.0) > 0
        self.producer.poll(0)
        self._raise_delivery_failures()
        self._retry_outages()
        self._retry_budget_held()
        self._maybe_commit()
        room = self.max_in_flight - len(self._in_engine)
        if room > 0 and self._admitting():
            self._set_full(False)
            # A short wait when requests are in flight (their completions must not wait behind consume);
            # librdkafka returns as soon as ``room`` records are there.
            wait = 0.0 if not self._done.empty() else (0.005 if self._in_engine else 0.05)
            msgs = self.consumer.consume(min(room, 500), wait)
            if msgs:
                progressed |= self._admit(msgs)
        else:
            # an outage lasts: pause at once; a full window or an exactly-once drain: after PAUSE_AFTER_S
            self._set_full(
                True, at_once=self._engine_outage.since is not None or self._media_outage.since is not None
            )
            # wait for a completion; while paused, keep serving the consumer (membership, rebalances)
            progressed |= self._collect_done(0.05) > 0
            if self._paused:
                msgs = self.consumer.consume(16, 0)
                if msgs:  # a partition assigned while paused may deliver: take its records anyway
                    progressed |= self._admit(msgs)
        return progressed

    def _admitting(self) -> bool:
        return not (
            self._stop.is_set()
            or self._draining
            or bool(self._budget_held)  # image posts wait for the image budget: take nothing more
            or self._engine_outage.since is not None
            or self._media_outage.since is not None
        )

    def _set_full(self, full: bool, at_once: bool = False) -> None:
        now = time.monotonic()
        if not full:
            self._full_since = None
            if self._paused:
                self.consumer.resume(self.consumer.assignment())
                self._paused = False
                self.sensor.on_paused(0)
            return
        if self._full_since is None:
            self._full_since = now
        if not self._paused and (at_once or now - self._full_since > self.s.pause_after_s):
            parts = self.consumer.assignment()
            self.consumer.pause(parts)
            self._paused = True
            self.sensor.on_paused(len(parts))
            log.info("window_full_partitions_paused", partitions=len(parts), in_engine=len(self._in_engine))
            self._event("paused", in_engine=len(self._in_engine))

    def _quiet(self) -> bool:
        """Nothing in flight, nothing held, every output acknowledged and committed."""
        if self._in_engine or self._engine_held or self._media_held or self._budget_held:
            return False
        if not self.offsets.all_complete():
            self.producer.poll(0.01)  # acks still coming
            self._raise_delivery_failures()
            return False
        self._commit_now()
        return not self.offsets.pending_commits()

    # ------------------------------------------------------------ admission
    def _admit(self, msgs: list[Message]) -> bool:
        entered: list[tuple[int, Record]] = []
        for m in msgs:
            r = self._to_record(m)
            if r is None:
                continue
            epoch = self.offsets.add((r.topic, r.partition), r.offset)
            if epoch is not None:  # None: consumed for a partition revoked meanwhile (re-delivered)
                entered.append((epoch, r))
        if entered:
            self._dispatch(entered)
        return bool(entered)

    def _dispatch(self, entered: list[tuple[int, Record]]) -> None:
        """Decode records; admit the image posts the image budget has room for (the rest wait, unfetched,
        in ``_budget_held``); prepare the admitted (fetch, hash, cache): misses go to the engine, the rest
        publish now."""
        decoded = self.moderator.decode([r for _e, r in entered])
        self._route([(epoch, p) for (epoch, _r), p in zip(entered, decoded, strict=True)])

    def _route(self, decoded: list[tuple[int, Prepared]]) -> None:
        go: list[tuple[int, Prepared]] = []
        reserved = 0
        for epoch, p in decoded:
            refs = p.image_refs
            if refs:
                need = self.images.worst_case(refs)
                # FIFO: no image post overtakes one already waiting (a large post is never starved);
                # text-only posts and dead letters of this batch go on
                if self._budget_held or not self.images.try_reserve(need):
                    self._budget_held.append((epoch, p))
                    continue
                reserved += need
            go.append((epoch, p))
        if not go:
            return
        try:
            prepared = self.moderator.complete([p for _e, p in go])
        except BaseException:
            self.images.settle(reserved, [])  # nothing of the batch is kept
            raise
        # the worst case reserved becomes the bytes actually decoded, one lease per post
        leases = self.images.settle(reserved, [p.item.images if p.item else () for p in prepared])
        now_ready: list[Job] = []
        unavailable: list[tuple[int, Record]] = []
        for (epoch, p), lease in zip(go, leases, strict=True):
            if p.unavailable is not None:
                if lease is not None:
                    lease.release()
                unavailable.append((epoch, p.record))
                continue
            job = Job(p, epoch, lease=lease)
            if p.needs_engine:
                self._submit(job)
            else:
                now_ready.append(job)
        if unavailable:
            self._media_held.extend(unavailable)
            self._media_outage.down(time.monotonic(), prepared[0].unavailable or "S3 unavailable")
            self._update_ready()
        elif self._media_outage.since is not None and any(p.item and p.item.images for p in prepared):
            self._media_outage.up(time.monotonic())
            self._update_ready()
        if now_ready:
            self._publish_jobs(now_ready)
        self._set_in_flight_metric()

    def _retry_budget_held(self) -> None:
        """Admit the image posts that waited for the image budget, as far as it has room now."""
        held = self._budget_held
        if not held or self._draining or self._stop.is_set():  # an exactly-once drain, a shutdown
            return
        if self._engine_outage.since is not None or self._media_outage.since is not None:
            return
        if not self.images.fits(self.images.worst_case(held[0][1].image_refs)):
            return
        self._budget_held = []
        self._route([(e, p) for e, p in held if self.offsets.current(_tp(p.record), e)])

    def _set_in_flight_metric(self) -> None:
        self.sensor.on_in_flight(
            len(self._in_engine) + len(self._engine_held) + len(self._media_held) + len(self._budget_held)
        )

    def _submit(self, job: Job) -> None:
        assert job.prepared.item is not None
        fut = self._engine.submit(self._engine.judge(job.prepared.item))
        job.future = fut
        self._in_engine.add(job)
        fut.add_done_callback(lambda _f, job=job: self._done.put(job))  # type: ignore[misc]

    def _collect_done(self, block_s: float) -> int:
        """Take finished requests off the queue (waiting up to ``block_s`` for the first) and publish them."""
        jobs: list[Job] = []
        try:
            jobs.append(self._done.get(timeout=block_s) if block_s > 0 else self._done.get_nowait())
            while True:
                jobs.append(self._done.get_nowait())
        except queue.Empty:
            pass
        if not jobs:
            return 0
        finished: list[Job] = []
        now = time.monotonic()
        for job in jobs:
            self._in_engine.discard(job)
            if not self.offsets.current(job.tp, job.epoch):
                job.release_images()
                continue  # revoked meanwhile: not ours to publish
            assert job.future is not None
            try:
                res = job.future.result()
            except CancelledError:
                job.release_images()
                continue
            except EngineDeadError as exc:
                self._engine_held.append(job)
                self._engine_outage.down(now, repr(exc))
                self._update_ready()
                continue
            except Exception as exc:  # a bug in the request policy: this post's dead letter, not a crash
                log.error(
                    "engine_request_crashed",
                    post_id=job.prepared.item and job.prepared.item.post_id,
                    exc_info=exc,
                )
                job.prepared.error = (ErrorCode.INTERNAL_ERROR, type(exc).__name__, repr(exc)[:1000])
                finished.append(job)
                continue
            if isinstance(res, Verdict):
                job.prepared.verdict = res
                if self._engine_outage.since is not None:
                    self._engine_outage.up(now)
                    self._update_ready()
            else:
                job.prepared.error = res
            finished.append(job)
        if finished:
            self._publish_jobs(finished)
        self._set_in_flight_metric()
        return len(finished)

    def _retry_outages(self) -> None:
        now = time.monotonic()
        for outage, err in ((self._engine_outage, EngineUnavailable), (self._media_outage, MediaOutage)):
            if outage.overdue(now):
                assert outage.since is not None
                log.error(f"{outage.name}_unavailable_giving_up", down_for_s=round(now - outage.since, 1))
                setting = f"GUARDSTREAM_{outage.name.upper()}_DEADLINE_S"
                raise err(
                    f"{outage.name} unavailable for {now - outage.since:.0f}s "
                    f"(deadline {outage.deadline_s:g}s, {setting}); nothing past it was committed"
                )
        if self._engine_held and now >= self._engine_outage.next_try:
            held, self._engine_held = self._engine_held, []
            for job in held:  # the engine decides whether it is back: the posts themselves are the probe
                self._submit(job)
            self._engine_outage.retried(now)
        if self._media_held and now >= self._media_outage.next_try:
            held_media, self._media_held = self._media_held, []
            self._media_outage.retried(now)
            live = [(e, r) for e, r in held_media if self.offsets.current((r.topic, r.partition), e)]
            if live:
                self._dispatch(live)
            if not self._media_held:
                self._media_outage.up(now)
                self._update_ready()
        if not self._engine_held and not self._in_engine and self._engine_outage.since is not None:
            self._engine_outage.up(now)  # nothing left that failed: admit again
            self._update_ready()

    # ------------------------------------------------------------ publish
    def _publish_jobs(self, jobs: list[Job]) -> None:
        try:
            outcomes = self.moderator.finish([j.prepared for j in jobs])
        finally:
            # the outcome is built: the images are no longer needed, even while the acks are awaited
            for j in jobs:
                j.prepared.drop_images()
                j.release_images()
        for job, o in zip(jobs, outcomes, strict=True):
            job.outcome = o
            job.remaining = len(o.outputs)
            if self.transactional:
                # produced with the offsets in the interval's transaction: both visible, or neither
                self._txn_buffer.extend((job, out) for out in o.outputs)
                self.offsets.complete(job.tp, job.epoch, o.record.offset)
                continue
            for out in o.outputs:
                self._produce(job, out)
        st = self.stats
        st.batches += 1
        st.consumed += len(outcomes)
        for o in outcomes:
            if o.kind is OutcomeKind.VERDICT:
                st.verdicts += 1
            else:
                st.dead_letters += 1
        if self.keep_outcomes:
            st.outcomes.extend(outcomes)
        if self._on_batch is not None:
            self._since_commit.extend(outcomes)

    def _produce(self, job: Job, out: Output) -> None:
        cb = functools.partial(self._delivered, job, out)
        while True:
            try:
                self.producer.produce(out.topic, out.value, out.key, on_delivery=cb)
                return
            except BufferError:
                self.producer.poll(0.1)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.code() in _TOO_LARGE:
                    smaller = self._shrink(job, out, err)
                    cb = functools.partial(self._delivered, job, smaller)
                    out = smaller
                    continue
                raise PublishError(f"produce to {out.topic} failed: {exc}") from exc

    def _shrink(self, job: Job, out: Output, err: KafkaError) -> Output:
        assert job.outcome is not None
        smaller = shrink_output(out, job.outcome)
        if smaller is None or len(smaller.value) >= len(out.value):
            raise PublishError(f"{out.topic}: {err.str()} and nothing left to trim ({len(out.value)} bytes)")
        self.sensor.on_output_trimmed()
        log.warning(
            "output_too_large_trimmed",
            topic=out.topic,
            post_id=job.outcome.post_id,
            size=len(out.value),
            trimmed_size=len(smaller.value),
        )
        return smaller

    def _delivered(self, job: Job, out: Output, err: KafkaError | None, _msg: Message) -> None:
        """Delivery report (main thread, from poll/flush). The record completes with its last ack."""
        if err is not None:
            if err.code() in _TOO_LARGE:
                self._too_large.append((job, out))
            else:
                self._failures.append(f"{out.topic}: {err.str()}")
            return
        job.remaining -= 1
        if job.remaining == 0 and not self.transactional:
            self.offsets.complete(job.tp, job.epoch, job.prepared.record.offset)

    def _raise_delivery_failures(self) -> None:
        while self._too_large:
            job, out = self._too_large.pop()
            err = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
            self._produce(job, self._shrink(job, out, err))
        if self._failures:
            raise PublishError(
                f"{len(self._failures)} output(s) not acknowledged (first: {self._failures[0]}); "
                "nothing at or past those records is committed"
            )

    def _flush_acks(self) -> None:
        """Wait (bounded by ``produce_timeout_s``) for the acks of everything produced so far."""
        remaining = self.producer.flush(self.s.kafka.produce_timeout_s)
        self._raise_delivery_failures()
        if self._too_large:
            remaining = self.producer.flush(self.s.kafka.produce_timeout_s)
        if remaining:
            raise PublishError(
                f"{remaining} output(s) unacknowledged after {self.s.kafka.produce_timeout_s:g}s"
            )

    # ------------------------------------------------------------ commit
    def _maybe_commit(self) -> None:
        if time.monotonic() - self._last_commit < self.s.commit_interval_ms / 1000.0:
            return
        if not self.transactional:
            self._commit_now()
            return
        if not self._txn_buffer and not self.offsets.pending_commits():
            self._last_commit = time.monotonic()
            return
        # exactly-once: stop admitting, let in-flight requests finish, then commit the transaction
        self._draining = True
        if not self._in_engine:
            self._commit_transaction()

    def _commit_now(self) -> None:
        if self.transactional:
            if not self._in_engine:
                self._commit_transaction()
        else:
            self._commit()
        self._last_commit = time.monotonic()

    def _commit(self, only: set[TP] | None = None) -> None:
        """Synchronous commit of each partition's watermark; a coordinator that is away (broker restart,
        failover) is retried until ``broker_deadline_s``. A commit refused by a rebalance is not fatal."""
        pending = self.offsets.pending_commits(only)
        if pending:
            offsets = [TopicPartition(t, p, off) for (t, p), off in pending.items()]
            give_up = time.monotonic() + self.s.kafka.broker_deadline_s
            while True:
                try:
                    self.consumer.commit(offsets=offsets, asynchronous=False)
                    break
                except KafkaException as exc:
                    err = exc.args[0] if exc.args else None
                    if isinstance(err, KafkaError) and err.code() in _GENERATION_LOST:
                        # Published but not committed: whoever owns the partitions after the rebalance
                        # (maybe us again) re-reads from the last commit. A re-publish, never a loss.
                        log.warning("commit_lost_to_rebalance", error=err.str(), partitions=len(offsets))
                        self.sensor.on_commit_lost()
                        return
                    if not isinstance(err, KafkaError) or err.code() not in _COORDINATOR_AWAY:
                        raise
                    if time.monotonic() > give_up:
                        raise
                    log.warning("commit_retrying", error=err.str())
                    self._stop.wait(0.5)  # backoff, not synchronization
            self.offsets.mark_committed(pending)
            self.stats.commits += 1
            self.sensor.on_commit()
            self._after_commit()

    def _after_commit(self) -> None:
        if self._on_batch is not None and self._since_commit:
            done, self._since_commit = self._since_commit, []
            self._on_batch(done)

    def _commit_transaction(self) -> None:
        """Outputs and the consumed offsets in one transaction: all become visible to read_committed
        readers together, or none do (a crash leaves the transaction to be aborted on restart)."""
        pending = self.offsets.pending_commits()
        if not pending and not self._txn_buffer:
            self._draining = False
            return
        batch, self._txn_buffer = self._txn_buffer, []
        try:
            self.producer.begin_transaction()
            for job, out in batch:
                self._produce(job, out)
            if pending:
                self.producer.send_offsets_to_transaction(
                    [TopicPartition(t, p, off) for (t, p), off in pending.items()],
                    self.consumer.consumer_group_metadata(),
                    self.s.kafka.produce_timeout_s,
                )
            self.producer.commit_transaction(self.s.kafka.produce_timeout_s)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if err is not None and getattr(err, "txn_requires_abort", lambda: False)():
                self.producer.abort_transaction(self.s.kafka.produce_timeout_s)
            raise PublishError(f"transaction failed, nothing committed: {exc}") from exc
        self._draining = False
        self._raise_delivery_failures()
        self.offsets.mark_committed(pending)
        self.stats.commits += 1
        self.sensor.on_commit()
        self._last_commit = time.monotonic()
        self._after_commit()

    def _abort_transaction(self) -> None:
        """Nothing of the interval was produced yet: dropping the buffer is the abort."""
        self._txn_buffer.clear()
        self._draining = False
        self._since_commit.clear()

    # ------------------------------------------------------------ shutdown
    def _wait_in_flight(self, which: Callable[[Job], bool], timeout_s: float) -> None:
        """Publish completions until no matching request is in the engine, or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while any(which(j) for j in self._in_engine):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("in_flight_wait_timed_out", left=sum(1 for j in self._in_engine if which(j)))
                return
            self._collect_done(min(left, 0.05))
            self.producer.poll(0)
            self._raise_delivery_failures()

    def _shutdown(self) -> None:
        """Stop admitting; finish in-flight requests (bounded by ``shutdown_timeout_s``); publish, wait for
        the acks and commit the watermark. What did not finish is left uncommitted (re-delivered)."""
        self._stop.set()
        self._wait_in_flight(lambda _j: True, self.s.shutdown_timeout_s)
        if self.transactional:
            if self._in_engine:
                self._abort_transaction()
            else:
                self._commit_transaction()
        else:
            self._flush_acks()
            self._commit()

    # ------------------------------------------------------------ records, end
    def _to_record(self, m: Message) -> Record | None:
        err = m.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                self._eof[(m.topic() or "", m.partition() or 0)] = m.offset() or 0
                return None
            if err.fatal():
                raise KafkaException(err)
            log.warning("consumer_error", error=str(err))
            return None
        ts_type, ts = m.timestamp()
        topic, partition, offset = m.topic(), m.partition(), m.offset()
        assert topic is not None and partition is not None and offset is not None
        if offset >= self._eof.get((topic, partition), offset + 1):
            del self._eof[(topic, partition)]
        return Record(topic, partition, offset, m.key(), m.value(), ts if ts_type else None)

    def _at_end(self) -> bool:
        """True when the group owns partitions and each one is consumed *and committed* up to the end
        offset its last end-of-partition event reported. Called only with nothing in flight.

        EOF offsets, not watermarks: Tansu's high watermark is the last record *batch's* base offset + 1
        and cannot be compared with positions. librdkafka reports each end offset once, so they are kept
        across rebalances; after one, a partition's position is unknown until it delivers again, and
        the committed offset answers instead.
        """
        assignment = self.consumer.assignment()
        if not assignment:
            return False
        ends = [self._eof.get((tp.topic, tp.partition)) for tp in assignment]
        if any(e is None for e in ends):
            return False
        try:
            positions = self.consumer.position(assignment)
            unknown = [tp for tp in positions if tp.offset < 0]
            if unknown:
                # no commit yet: the group starts at the beginning (auto.offset.reset=earliest)
                done = {(t.topic, t.partition): max(t.offset, 0) for t in self.consumer.committed(unknown, 5)}
                positions = [
                    TopicPartition(tp.topic, tp.partition, done.get((tp.topic, tp.partition), -1))
                    if tp.offset < 0
                    else tp
                    for tp in positions
                ]
        except KafkaException:  # broker unreachable: not known to be at the end
            return False
        return all(tp.offset >= (end or 0) for tp, end in zip(positions, ends, strict=True))

    def close(self) -> None:
        self._closing = True
        self._engine.close(self.s.shutdown_timeout_s)
        # what shutdown left in the engine (abandoned, uncommitted) gives its images back
        for job in [*self._in_engine, *self._engine_held]:
            job.release_images()
        self._budget_held.clear()
        try:
            self.consumer.close()
        finally:
            self.producer.flush(5)
            # the clients hold our error callback (a cycle the C extension's objects keep alive):
            # drop them so the producer's threads stop now instead of reconnecting forever
            del self.producer, self.consumer
            self.moderator.close()


def _tp(r: Record) -> TP:
    return (r.topic, r.partition)
