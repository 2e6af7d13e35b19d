"""The Kafka side: consume a micro-batch, hand it to the ``Moderator``, publish, then commit.

Guarantee (default): at-least-once with no loss. Offsets are committed only after every message of
the batch (verdicts, novel-risk copies, dead letters) has been acknowledged by the broker
(``acks=all``, idempotent producer). A crash before the commit re-delivers the batch; the verdict
cache makes the re-run cheap and gives identical verdicts.

Pipelining: the engine runs on its own thread. While batch N is in the engine, the main thread
consumes batch N+1, decodes it, fetches its images and looks it up in the cache, so the engine is
fed again as soon as it finishes. Batches are published and committed strictly in order. The engine
thread does nothing but the model call (``Moderator.moderate``); building, serializing and caching the
verdicts (``Moderator.finish``) runs on the main thread, so the two threads never fight over the GIL
(a busy second thread costs every blocking Kafka call on the main thread up to a 5 ms switch interval).
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from types import FrameType

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from workers import metrics
from workers.core import Moderator, Outcome, Prepared, Record
from workers.kafka_config import consumer_config, producer_config
from workers.settings import DeliveryMode, Settings

log = structlog.get_logger(__name__)


class PublishError(RuntimeError):
    """The broker did not acknowledge every message of a batch: nothing is committed."""


class BrokerUnavailable(RuntimeError):
    """No broker answered for longer than ``broker_deadline_s``: the worker gives up (nothing is lost:
    uncommitted posts are re-delivered to whoever consumes the partitions next)."""


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


@dataclass
class RunStats:
    consumed: int = 0
    verdicts: int = 0
    dead_letters: int = 0
    batches: int = 0
    commits: int = 0
    outcomes: list[Outcome] = field(default_factory=list)


class KafkaWorker:
    def __init__(self, settings: Settings, moderator: Moderator) -> None:
        self.s = settings
        self.moderator = moderator
        self._broker_down_since: float | None = None
        self._next_probe = 0.0
        self.consumer = Consumer({**consumer_config(settings), "error_cb": self._on_kafka_error}, logger=None)
        self.transactional = settings.delivery is DeliveryMode.EXACTLY_ONCE
        pcfg = {**producer_config(settings), "error_cb": self._on_kafka_error}
        if self.transactional:
            pcfg["transactional.id"] = (
                settings.transactional_id or f"{settings.group_id}-{socket.gethostname()}"
            )
        self.producer = Producer(pcfg)
        if self.transactional:
            # fences any zombie with the same id and aborts its open transaction
            self.producer.init_transactions(settings.produce_timeout_s)
        self._engine_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._pending: tuple[Future[None], list[Prepared]] | None = None
        self._paused = False
        # end offset of each partition as last reported by an end-of-partition event (librdkafka reports
        # an end offset once: it is kept across rebalances, and dropped when records arrive past it)
        self._eof: dict[tuple[str, int], int] = {}
        self._carry: list[Message] = []  # consumed while paused (a newly assigned partition), not yet used
        self._stop = threading.Event()
        self._revoked: set[tuple[str, int]] = set()
        self._assigned: set[tuple[str, int]] = set()
        self.stats = RunStats()
        self.keep_outcomes = False

    # ------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _on_kafka_error(self, err: KafkaError) -> None:
        """librdkafka's client-level errors (served on the main thread, from consume/flush)."""
        if err.code() in _UNREACHABLE:
            if self._broker_down_since is None:
                self._broker_down_since = time.monotonic()
                log.warning(
                    "broker_unreachable_retrying",
                    error=err.str(),
                    deadline_s=self.s.broker_deadline_s,
                    bootstrap=self.s.bootstrap_servers,
                )
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
            self.consumer.list_topics(self.s.posts_topic, timeout=1.0)
        except KafkaException as exc:
            down_for = time.monotonic() - since
            metrics.BROKER_DOWN_SECONDS.set(down_for)
            if down_for > self.s.broker_deadline_s:
                log.error(
                    "broker_unavailable_giving_up",
                    down_for_s=round(down_for, 1),
                    deadline_s=self.s.broker_deadline_s,
                    bootstrap=self.s.bootstrap_servers,
                    error=str(exc),
                )
                raise BrokerUnavailable(
                    f"no broker at {self.s.bootstrap_servers} answered for {down_for:.0f}s "
                    f"(deadline {self.s.broker_deadline_s:g}s)"
                ) from None
            return
        log.info("broker_reachable_again", down_for_s=round(time.monotonic() - since, 1))
        metrics.BROKER_DOWN_SECONDS.set(0)
        self._broker_down_since = None

    def _on_assign(self, c: Consumer, parts: list[TopicPartition]) -> None:
        self._assigned |= {(p.topic, p.partition) for p in parts}
        # librdkafka keeps a partition's pause flag across revoke/assign: set it to what we want now
        if self._paused:
            c.pause(parts)
        else:
            c.resume(parts)
        metrics.HEALTH.ready = True
        log.info("partitions_assigned", partitions=sorted(p.partition for p in parts))

    def _on_revoke(self, _c: Consumer, parts: list[TopicPartition]) -> None:
        # Finish (publish + commit) the batch already in the engine while we still own its partitions;
        # records being collected for the next batch are dropped uncommitted and re-delivered elsewhere.
        log.info("partitions_revoked", partitions=sorted(p.partition for p in parts))
        self._drain_pending()
        lost = {(p.topic, p.partition) for p in parts}
        self._revoked |= lost
        self._assigned -= lost
        self._carry = [m for m in self._carry if (m.topic(), m.partition()) not in lost]

    def run(
        self,
        *,
        until_drained: bool = False,
        idle_timeout_s: float | None = None,
        on_batch: Callable[[list[Outcome]], None] | None = None,
    ) -> RunStats:
        """Run until ``stop()`` (SIGTERM), or until every assigned partition is consumed to its end."""
        self.consumer.subscribe([self.s.posts_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._on_batch = on_batch
        last_progress = time.monotonic()
        last_lag = 0.0
        try:
            while not self._stop.is_set():
                metrics.HEALTH.beat()
                self._check_broker()
                if time.monotonic() - last_lag > self.s.lag_interval_s:
                    self._update_lag()
                    last_lag = time.monotonic()
                window = self._collect()
                if window:
                    last_progress = time.monotonic()
                # Wait for the engine to finish batch N, hand it batch N+1 at once (the GPU never waits
                # on Kafka), then publish and commit batch N while N+1 runs.
                finished = self._take_pending()
                window = self._drop_revoked(window)  # a rebalance may have run while we waited
                if window:
                    self._pending = (self._engine_pool.submit(self.moderator.moderate, window), window)
                if finished is not None:
                    self._publish_and_commit(finished)
                elif not window and until_drained and self._pending is None and self._at_end():
                    break
                if idle_timeout_s is not None and time.monotonic() - last_progress > idle_timeout_s:
                    log.info("idle_timeout", seconds=idle_timeout_s)
                    break
            self._drain_pending()
        finally:
            metrics.HEALTH.ready = False
            self.close()
        return self.stats

    def _update_lag(self) -> None:
        """Consumer lag per owned partition (end offset minus committed position) for autoscaling."""
        try:
            assignment = self.consumer.assignment()
            if not assignment:
                return
            for tp in self.consumer.position(assignment):
                _lo, hi = self.consumer.get_watermark_offsets(tp, timeout=2, cached=True)
                pos = tp.offset if tp.offset >= 0 else 0
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(hi - pos, 0))
        except KafkaException as exc:
            log.debug("lag_update_failed", error=str(exc))

    # ------------------------------------------------------------ steps
    def _collect(self) -> list[Prepared]:
        """Consume and prepare records until ``max_batch_size`` cache misses or ``max_wait_ms`` passes."""
        deadline = time.monotonic() + self.s.max_wait_ms / 1000.0
        window: list[Prepared] = []
        misses = 0
        self._revoked.clear()
        while misses < self.s.max_batch_size and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 and window:
                break
            if self._carry:
                msgs, self._carry = self._carry, []
            else:
                msgs = self.consumer.consume(self.s.max_batch_size - misses, max(remaining, 0.05))
            records = [r for r in (self._to_record(m) for m in msgs) if r is not None]
            if records:
                prepared = self.moderator.prepare(records)
                misses += Moderator.misses(prepared)
                window.extend(prepared)
                metrics.IN_FLIGHT.inc(len(records))
            elif remaining <= 0:
                break
        return self._drop_revoked(window)

    def _drop_revoked(self, window: list[Prepared]) -> list[Prepared]:
        """Records of partitions revoked since they were consumed: not ours to publish any more (they are
        uncommitted, so the partition's new owner consumes them again)."""
        if not self._revoked:
            return window
        kept = [p for p in window if (p.record.topic, p.record.partition) not in self._revoked]
        metrics.IN_FLIGHT.dec(len(window) - len(kept))
        return kept

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

    def _take_pending(self) -> list[Prepared] | None:
        """Wait for the batch in the engine. A slow engine does not make the worker read ahead: after
        ``pause_after_s`` the owned partitions are paused, and the consumer keeps being served (group
        membership, rebalances, error callbacks) without taking on new posts until the engine is done."""
        pending = self._pending
        if pending is None:
            return None
        fut, window = pending
        if not self._wait(fut, self.s.pause_after_s):
            self._wait_paused(fut)
            if self._pending is not pending:  # a revoke during the wait already published it
                return None
        self._pending = None
        fut.result()
        return window

    @staticmethod
    def _wait(fut: Future[None], timeout: float) -> bool:
        return bool(futures_wait([fut], timeout=timeout).done)

    def _wait_paused(self, fut: Future[None]) -> None:
        paused = self.consumer.assignment()
        self.consumer.pause(paused)
        self._paused = True  # partitions assigned during the wait are paused too (see _on_assign)
        metrics.PAUSED_PARTITIONS.set(len(paused))
        log.info(
            "engine_slow_partitions_paused",
            partitions=len(paused),
            in_flight=len(self._pending[1]) if self._pending else 0,
        )
        try:
            while not self._wait(fut, 0.1):
                self._check_broker()
                # Paused partitions deliver nothing; a partition assigned meanwhile may: keep its records.
                room = self.s.max_batch_size - len(self._carry)
                if room > 0:
                    self._carry.extend(self.consumer.consume(room, 0.1))
        finally:
            self._paused = False
            self.consumer.resume(self.consumer.assignment())
            metrics.PAUSED_PARTITIONS.set(0)

    def _drain_pending(self) -> None:
        """Publish and commit the batch in the engine, waiting for it as long as it takes (shutdown,
        partition revoke: the batch is finished while this worker still owns its partitions)."""
        if self._pending is None:
            return
        fut, window = self._pending
        self._pending = None
        fut.result()
        self._publish_and_commit(window)

    def _publish_and_commit(self, window: list[Prepared]) -> None:
        outcomes = self.moderator.finish(window)
        if self.transactional:
            self._publish_transaction(outcomes)
        else:
            self._publish(outcomes)
            self._commit(outcomes)
        metrics.IN_FLIGHT.dec(len(window))
        st = self.stats
        st.batches += 1
        st.consumed += len(outcomes)
        st.verdicts += sum(1 for o in outcomes if o.kind == "verdict")
        st.dead_letters += sum(1 for o in outcomes if o.kind == "dead_letter")
        if self.keep_outcomes:
            st.outcomes.extend(outcomes)
        if self._on_batch is not None:
            self._on_batch(outcomes)

    def _publish(self, outcomes: list[Outcome]) -> None:
        failures: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        for o in outcomes:
            for out in o.outputs:
                while True:
                    try:
                        self.producer.produce(out.topic, out.value, out.key, on_delivery=on_delivery)
                        break
                    except BufferError:
                        self.producer.poll(0.1)
        remaining = self.producer.flush(self.s.produce_timeout_s)
        if remaining or failures:
            raise PublishError(
                f"{remaining} message(s) unacknowledged, {len(failures)} failed "
                f"(first: {failures[0] if failures else 'timeout'}); offsets not committed"
            )

    @staticmethod
    def _next_offsets(outcomes: list[Outcome]) -> list[TopicPartition]:
        nxt: dict[tuple[str, int], int] = {}
        for o in outcomes:
            tp = (o.record.topic, o.record.partition)
            nxt[tp] = max(nxt.get(tp, -1), o.record.offset + 1)
        return [TopicPartition(t, p, off) for (t, p), off in nxt.items()]

    def _publish_transaction(self, outcomes: list[Outcome]) -> None:
        """Outputs and the consumed offsets in one transaction: all become visible to read_committed
        readers together, or none do (a crash leaves the transaction to be aborted on restart)."""
        offsets = self._next_offsets(outcomes)
        try:
            self.producer.begin_transaction()
            for o in outcomes:
                for out in o.outputs:
                    self.producer.produce(out.topic, out.value, out.key)
            if offsets:
                self.producer.send_offsets_to_transaction(
                    offsets, self.consumer.consumer_group_metadata(), self.s.produce_timeout_s
                )
            self.producer.commit_transaction(self.s.produce_timeout_s)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if err is not None and getattr(err, "txn_requires_abort", lambda: False)():
                self.producer.abort_transaction(self.s.produce_timeout_s)
            raise PublishError(f"transaction failed, nothing committed: {exc}") from exc
        self.stats.commits += 1
        metrics.COMMITS.inc()

    def _commit(self, outcomes: list[Outcome]) -> None:
        """Synchronous offset commit; a coordinator that is away (broker restart, failover) is retried
        until ``broker_deadline_s``. Losing the partitions (fenced generation) is not retried: raise."""
        offsets = self._next_offsets(outcomes)
        if not offsets:
            return
        give_up = time.monotonic() + self.s.broker_deadline_s
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
                    metrics.COMMITS_LOST.inc()
                    return
                if not isinstance(err, KafkaError) or err.code() not in _COORDINATOR_AWAY:
                    raise
                if time.monotonic() > give_up:
                    raise
                log.warning("commit_retrying", error=err.str())
                self._stop.wait(0.5)  # backoff, not synchronization
        self.stats.commits += 1
        metrics.COMMITS.inc()

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
        self._engine_pool.shutdown(wait=True)
        try:
            self.consumer.close()
        finally:
            self.producer.flush(5)
            # the clients hold our error callback (a cycle the C extension's objects keep alive):
            # drop them so the producer's threads stop now instead of reconnecting forever
            del self.producer, self.consumer
