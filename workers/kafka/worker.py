"""The Kafka loop of the streaming worker: consume, admit, hand misses to the engine, publish, checkpoint.

One path for every engine. The main thread owns the confluent-kafka consumer and producer; an asyncio
loop on the engine thread (``workers.pipeline.engine_loop``) awaits ``StreamingEngine.judge`` once per
cache miss, up to ``MAX_IN_FLIGHT`` outstanding, and each finished request comes back to the main thread
through a queue and is published the moment it returns. Cache hits and dead letters are published as
soon as they are prepared: they never wait behind engine work.

Where each step lives:
- a record is decoded, fetched, hashed and looked up in the cache by ``workers.pipeline.moderator``;
- between consume and publish it is in the window (``workers.kafka.window``): the image budget, the
  engine requests, what an outage holds back;
- its outputs are produced and their acks read by ``workers.kafka.publisher``;
- its offset is committed by ``workers.kafka.checkpoint`` at the partition's watermark
  (``workers.kafka.offsets``): never past a record whose outputs might not be on the broker;
- a broker outage is timed by ``workers.kafka.broker_watch``, an engine or S3 outage by
  ``workers.kafka.outages``; ``workers.kafka.run_until`` says when a run is over.

Backpressure: when ``MAX_IN_FLIGHT`` requests are outstanding, an image post waits for the image budget
(``INFLIGHT_IMAGE_BYTES``) or an outage lasts, the worker stops consuming and waits for completions; if
that lasts ``PAUSE_AFTER_S`` (at once for an outage) the partitions are paused and the consumer keeps
being served (group membership, rebalances) without reading ahead, and they are resumed when room frees
up. Text posts already consumed go on.

Rebalances: on revoke the worker waits up to ``REVOKE_TIMEOUT_S`` for the revoked partitions' requests,
publishes what finished, commits their watermarks, and drops the rest uncommitted (cancelled in the
engine; a completion arriving later carries a stale assignment epoch and is ignored).

Outages are not dead letters: a dead engine (``EngineDeadError``) or an unavailable S3
(``MediaUnavailable``) stops admission, keeps the affected records uncommitted, retries them with
backoff, marks the worker not ready, and exits (code 3) past ``ENGINE_DEADLINE_S``/``MEDIA_DEADLINE_S``.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, Producer, TopicPartition

from guard.types import StreamingEngine
from workers.kafka.broker_watch import BrokerWatch
from workers.kafka.checkpoint import Checkpoint, OutcomeObserver
from workers.kafka.config import consumer_config, producer_config
from workers.kafka.errors import (  # re-exported: what a caller of the worker may catch
    BrokerUnavailable,
    EngineUnavailable,
    MediaOutage,
    PublishError,
    Unavailable,
)
from workers.kafka.jobs import Job
from workers.kafka.lag import LagReporter
from workers.kafka.offsets import TP, Offsets
from workers.kafka.outages import Outage
from workers.kafka.publisher import Publisher
from workers.kafka.run_until import RunUntil, is_partition_end
from workers.kafka.window import Window
from workers.media import ImageBudget
from workers.observability.sensors import Sensor
from workers.pipeline.engine_loop import EngineLoop
from workers.pipeline.moderator import Moderator
from workers.pipeline.records import OutcomeKind, Record
from workers.settings import DeliveryMode, Settings

__all__ = [
    "BrokerUnavailable",
    "EngineUnavailable",
    "KafkaWorker",
    "MediaOutage",
    "PublishError",
    "RunStats",
    "Unavailable",
]

log = structlog.get_logger(__name__)


@dataclass
class RunStats:
    consumed: int = 0  # records whose outcome was published
    verdicts: int = 0
    dead_letters: int = 0
    batches: int = 0  # groups of outcomes published together (commits: the sensor's ``on_commit``)


class KafkaWorker:
    def __init__(
        self,
        settings: Settings,
        moderator: Moderator,
        engine: StreamingEngine,
        *,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        sensor: Sensor | None = None,
        observers: Sequence[OutcomeObserver] = (),
    ) -> None:
        """``on_event(name, details)`` is told about "assigned", "paused", "revoking", "revoked" and
        "broker_down" (a seam for tests and embedding; called on the main thread). ``sensor`` gets the
        loop's events (liveness, readiness, window, commits, broker, lag) and the engine thread's; default:
        the moderator's (itself the process-wide Prometheus sensor unless it was given one).
        ``observers`` are told what each committed checkpoint covered (``OutcomeObserver``)."""
        self.s = settings
        k = settings.kafka
        self.moderator = moderator
        self.engine = engine
        self._on_event = on_event
        self.sensor = sensor if sensor is not None else moderator.sensor
        self.max_in_flight = settings.engine_config.max_in_flight or max(1, engine.max_in_flight)
        self.broker = BrokerWatch(
            k.bootstrap_servers,
            k.broker_deadline_s,
            self.sensor,
            on_down=lambda: self._event("broker_down"),
        )
        self.consumer = Consumer({**consumer_config(k), "error_cb": self.broker.on_error})
        transactional = k.delivery is DeliveryMode.EXACTLY_ONCE
        txn_id = (k.transactional_id or f"{k.group_id}-{socket.gethostname()}") if transactional else None
        pcfg = {**producer_config(k, transactional_id=txn_id), "error_cb": self.broker.on_error}
        self.producer = Producer(pcfg)
        if transactional:
            # fences any zombie with the same id and aborts its open transaction
            self.producer.init_transactions(k.produce_timeout_s)
        self.offsets = Offsets()
        self.publisher = Publisher(
            self.producer,
            timeout_s=k.produce_timeout_s,
            sensor=self.sensor,
            on_complete=None if transactional else self._acked,
        )
        self._stop = threading.Event()
        self.checkpoint = Checkpoint(
            self.consumer,
            self.producer,
            self.publisher,
            self.offsets,
            transactional=transactional,
            interval_s=settings.commit_interval_ms / 1000.0,
            broker_deadline_s=k.broker_deadline_s,
            produce_timeout_s=k.produce_timeout_s,
            sensor=self.sensor,
            stop=self._stop,
            observers=observers,
        )
        backoff = settings.outage_backoff_s
        self.window = Window(
            moderator,
            EngineLoop(engine, settings, sensor=self.sensor),
            self.offsets,
            # Normalised image bytes of every admitted post, from decode to outcome (INFLIGHT_IMAGE_BYTES):
            # decoded image posts that do not fit wait, unfetched, and admission stops (backpressure)
            ImageBudget.for_target(settings.media.inflight_image_bytes, settings.target_pixels),
            engine_outage=Outage("engine", settings.engine_deadline_s, backoff, EngineUnavailable),
            media_outage=Outage("media", settings.media.deadline_s, backoff, MediaOutage),
            sensor=self.sensor,
            on_readiness=self._update_ready,
        )
        self._paused = False
        self._full_since: float | None = None
        self._closing = False
        self.lag = LagReporter(
            self.consumer,
            topic=k.posts_topic,
            group_id=k.group_id,
            # not idle before the group had a chance to assign us something (a session timeout)
            idle_after_s=k.session_timeout_ms / 1000.0,
            sensor=self.sensor,
        )
        self._until = RunUntil()
        self.stats = RunStats()

    @property
    def transactional(self) -> bool:
        return self.checkpoint.transactional

    @property
    def images(self) -> ImageBudget:
        return self.window.images

    @property
    def waiting_for_image_budget(self) -> int:
        """Decoded image posts waiting, unfetched, for room in the image budget (admission is stopped)."""
        return self.window.waiting_for_image_budget

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

    def _probe_broker(self) -> None:
        self.consumer.list_topics(self.s.kafka.posts_topic, timeout=1.0)

    def readiness(self) -> tuple[bool, str]:
        """Ready: partitions assigned and engine and S3 available; else False and why (``/readyz``)."""
        if self.window.engine_outage.is_down:
            return False, "engine unavailable"
        if self.window.media_outage.is_down:
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
        log.info(
            "partitions_revoked", partitions=sorted(p for _t, p in lost), in_engine=len(self.window.in_engine)
        )
        self._event("revoking", partitions=lost)
        if self._closing:  # shutdown already committed what it could; an error path must commit nothing
            self._drop(lost)
            return
        if self.transactional:
            self._revoke_transactional(lost)
        else:
            # finish what the revoked partitions have in flight while we still own them (bounded)
            self._wait_in_flight(lambda j: j.tp in lost, self.s.revoke_timeout_s)
            self.publisher.flush_acks()
            self.checkpoint.commit(only=lost)
        self._drop(lost)
        self._update_ready()
        self._event("revoked", partitions=lost)

    def _revoke_transactional(self, lost: set[TP]) -> None:
        """Exactly-once: the open transaction holds outputs of every partition. Finish the in-flight work
        (bounded) and commit it; if it does not finish in time, abort it and rewind every partition we
        keep to its committed offset (their aborted outputs must be produced again)."""
        self._wait_in_flight(lambda _j: True, self.s.revoke_timeout_s)
        if not self.window.in_engine:
            self.checkpoint.commit_transaction()
            return
        log.warning("revoke_timeout_aborting_transaction", in_engine=len(self.window.in_engine))
        self.checkpoint.abort_transaction()
        kept = [tp for tp in self.offsets.parts if tp not in lost]
        self._drop(set(self.offsets.parts))
        self._rewind(kept)

    def _drop(self, tps: set[TP]) -> None:
        """Forget partitions: their requests are cancelled, what they held is let go."""
        self.window.drop(tps)
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
    def run(self, *, until_drained: bool = False, idle_timeout_s: float | None = None) -> RunStats:
        """Run until ``stop()`` (SIGTERM); with ``until_drained``, until every assigned partition is
        consumed and committed to its end; with ``idle_timeout_s``, until nothing happened for that long
        (``workers.kafka.run_until``)."""
        self.consumer.subscribe(
            [self.s.kafka.posts_topic], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        self.lag.restart()
        until = self._until = RunUntil(drained=until_drained, idle_timeout_s=idle_timeout_s)
        last_lag = 0.0
        self.sensor.on_max_in_flight(self.max_in_flight)
        log.info("worker_started", engine=self.engine.name, max_in_flight=self.max_in_flight)
        try:
            while not self._stop.is_set():
                self.sensor.on_beat()
                self.broker.check(self._probe_broker)
                now = time.monotonic()
                if now - last_lag > self.s.lag_interval_s:
                    self.lag.update()
                    last_lag = now
                if self._step():
                    until.progressed()
                elif until.drained and self._quiet() and until.ends.reached(self.consumer):
                    # it answered ``reached``: not known to be drained while it does not answer a probe
                    # (the broker deadline still applies)
                    if self.broker.confirm_up(self._probe_broker):
                        break
                    continue
                if until.idle_too_long():
                    log.info("idle_timeout", seconds=idle_timeout_s)
                    break
            self._shutdown()
        finally:
            self.sensor.on_ready(False, "stopped")
            self.close()
        return self.stats

    def _step(self) -> bool:
        """One turn of the loop; True when records were consumed or outcomes published."""
        w = self.window
        progressed = self._collect_done(0.0) > 0
        self.publisher.poll(0)
        self._publish_jobs(w.retry_outages())
        if not (self.checkpoint.draining or self._stop.is_set()):  # an exactly-once drain, a shutdown
            self._publish_jobs(w.admit_waiting())
        w.report()
        self.checkpoint.maybe_commit(in_flight=bool(w.in_engine))
        room = self.max_in_flight - len(w.in_engine)
        if room > 0 and self._admitting():
            self._set_full(False)
            # A short wait when requests are in flight (their completions must not wait behind consume);
            # librdkafka returns as soon as ``room`` records are there.
            wait = 0.0 if w.completions_waiting else (0.005 if w.in_engine else 0.05)
            msgs = self.consumer.consume(min(room, 500), wait)
            if msgs:
                progressed |= self._admit(msgs)
        else:
            # an outage lasts: pause at once; a full window or an exactly-once drain: after PAUSE_AFTER_S
            self._set_full(True, at_once=w.outage)
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
            or self.checkpoint.draining  # exactly-once: nothing new until the transaction is committed
            or not self.window.admitting  # an outage, or image posts waiting for the image budget
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
            log.info(
                "window_full_partitions_paused", partitions=len(parts), in_engine=len(self.window.in_engine)
            )
            self._event("paused", in_engine=len(self.window.in_engine))

    def _quiet(self) -> bool:
        """Nothing in flight, nothing held, every output acknowledged and committed."""
        if not self.window.quiet():
            return False
        if not self.offsets.all_complete():
            self.publisher.poll(0.01)  # acks still coming
            return False
        self.checkpoint.commit_now(in_flight=False)
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
            self._publish_jobs(self.window.admit(entered))
            self.window.report()
        return bool(entered)

    def _to_record(self, m: Message) -> Record | None:
        if is_partition_end(m):
            self._until.ends.saw_end(m)
            return None
        err = m.error()
        if err is not None:
            if err.fatal():
                raise KafkaException(err)
            log.warning("consumer_error", error=str(err))
            return None
        ts_type, ts = m.timestamp()
        topic, partition, offset = m.topic(), m.partition(), m.offset()
        assert topic is not None and partition is not None and offset is not None
        self._until.ends.saw_record((topic, partition), offset)
        return Record(topic, partition, offset, m.key(), m.value(), ts if ts_type else None)

    def _collect_done(self, block_s: float) -> int:
        """Publish the engine requests that finished (waiting up to ``block_s`` for the first)."""
        finished = self.window.collect(block_s)
        self._publish_jobs(finished)
        self.window.report()
        return len(finished)

    # ------------------------------------------------------------ publish
    def _publish_jobs(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        try:
            outcomes = self.moderator.finish([j.prepared for j in jobs])
        finally:
            # the outcome is built: the images are no longer needed, even while the acks are awaited
            for j in jobs:
                j.prepared.drop_images()
                j.release_images()
        for job, o in zip(jobs, outcomes, strict=True):
            job.outcome = o
            self.checkpoint.add(job)
        st = self.stats
        st.batches += 1
        st.consumed += len(outcomes)
        for o in outcomes:
            if o.kind is OutcomeKind.VERDICT:
                st.verdicts += 1
            else:
                st.dead_letters += 1

    def _acked(self, job: Job) -> None:
        """At-least-once: the broker acknowledged the last of ``job``'s outputs."""
        self.offsets.complete(job.tp, job.epoch, job.offset)

    # ------------------------------------------------------------ shutdown
    def _wait_in_flight(self, which: Callable[[Job], bool], timeout_s: float) -> None:
        """Publish completions until no matching request is in the engine, or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while any(which(j) for j in self.window.in_engine):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "in_flight_wait_timed_out", left=sum(1 for j in self.window.in_engine if which(j))
                )
                return
            self._collect_done(min(left, 0.05))
            self.publisher.poll(0)

    def _shutdown(self) -> None:
        """Stop admitting; finish in-flight requests (bounded by ``shutdown_timeout_s``); publish, wait for
        the acks and commit the watermark. What did not finish is left uncommitted (re-delivered)."""
        self._stop.set()
        self._wait_in_flight(lambda _j: True, self.s.shutdown_timeout_s)
        if self.transactional:
            if self.window.in_engine:
                self.checkpoint.abort_transaction()
            else:
                self.checkpoint.commit_transaction()
        else:
            self.publisher.flush_acks()
            self.checkpoint.commit()

    def close(self) -> None:
        self._closing = True
        self.window.close(self.s.shutdown_timeout_s)
        try:
            self.consumer.close()
        finally:
            self.producer.flush(5)
            # the clients hold our error callback (a cycle the C extension's objects keep alive):
            # drop them so the producer's threads stop now instead of reconnecting forever
            del self.producer, self.consumer, self.publisher, self.checkpoint
            self.moderator.close()
