"""When and how consumed offsets are committed: the checkpoint (quix-streams' ``checkpointing/``).

A checkpoint covers the outcomes published since the previous one. It is taken every
``COMMIT_INTERVAL_MS``, on revoke and on shutdown, and it never commits past a record whose outputs might
not be on the broker:

- **at-least-once**: outputs are produced the moment an outcome is built; a record is complete with its
  last broker ack (``Publisher``), and each partition is committed at its watermark, the first incomplete
  offset (``OffsetTracker``). A crash re-delivers from the watermark.
- **exactly-once**: the interval's outputs are kept in memory; at its end the worker stops admitting
  (``draining``), its in-flight requests finish, and the outputs and the consumed offsets go in one short
  transaction: read_committed readers see both, or neither. (A transaction held open for the whole
  interval is what a kill -9 would nearly always interrupt.)

``OutcomeObserver``s are told what each checkpoint covered, once it is committed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Protocol

import structlog
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from workers.kafka.errors import COORDINATOR_AWAY, GENERATION_LOST, PublishError, kafka_error
from workers.kafka.jobs import Job
from workers.kafka.offsets import TP, Offsets
from workers.kafka.publisher import Publisher
from workers.observability.sensors import Sensor
from workers.pipeline.records import Outcome, Output

log = structlog.get_logger(__name__)

COMMIT_RETRY_S = 0.5


class OutcomeObserver(Protocol):
    """Told about each committed checkpoint (the bench, tests, embedding code); called on the main
    thread, after the commit. ``workers.testing.OutcomeRecorder`` keeps what it is told."""

    def on_committed(self, outcomes: Sequence[Outcome]) -> None:
        """A checkpoint was committed; ``outcomes``: those published since the previous one."""


class Checkpoint:
    def __init__(
        self,
        consumer: Consumer,
        producer: Producer,
        publisher: Publisher,
        offsets: Offsets,
        *,
        transactional: bool,
        interval_s: float,
        broker_deadline_s: float,
        produce_timeout_s: float,
        sensor: Sensor,
        stop: threading.Event,
        observers: Sequence[OutcomeObserver] = (),
    ) -> None:
        """``stop``: set on shutdown; a commit's retry backoff waits on it."""
        self.consumer = consumer
        self.producer = producer
        self.publisher = publisher
        self.offsets = offsets
        self.transactional = transactional
        self.interval_s = interval_s
        self.broker_deadline_s = broker_deadline_s
        self.produce_timeout_s = produce_timeout_s
        self.sensor = sensor
        self._stop = stop
        self._observers = tuple(observers)
        self.commits = 0
        # exactly-once: stop admitting until the transaction is committed
        self.draining = False
        # exactly-once: the interval's outputs, produced only inside the short transaction at its end
        self._buffer: list[tuple[Job, Output]] = []
        self._since: list[Outcome] = []  # published since the last commit (kept only for observers)
        self._last = time.monotonic()

    def add(self, job: Job) -> None:
        """``job``'s outcome is built: produce its outputs (at-least-once) or keep them for the interval's
        transaction, where the record counts as complete (exactly-once)."""
        o = job.outcome
        assert o is not None
        job.remaining = len(o.outputs)
        if self.transactional:
            # produced with the offsets in the interval's transaction: both visible, or neither
            self._buffer.extend((job, out) for out in o.outputs)
            self.offsets.complete(job.tp, job.epoch, job.offset)
        else:
            for out in o.outputs:
                self.publisher.produce(job, out)
        if self._observers:
            self._since.append(o)

    def maybe_commit(self, *, in_flight: bool) -> None:
        """Commit if the interval is over. Exactly-once: start draining, and commit once nothing is in
        flight (``in_flight``: requests of this interval are still in the engine)."""
        if time.monotonic() - self._last < self.interval_s:
            return
        if not self.transactional:
            self.commit_now(in_flight=in_flight)
            return
        if not self._buffer and not self.offsets.pending_commits():
            self._last = time.monotonic()
            return
        self.draining = True
        if not in_flight:
            self.commit_transaction()

    def commit_now(self, *, in_flight: bool) -> None:
        if self.transactional:
            if not in_flight:
                self.commit_transaction()
        else:
            self.commit()
        self._last = time.monotonic()

    def commit(self, only: set[TP] | None = None) -> None:
        """At-least-once: a synchronous commit of each partition's watermark (``only`` these). A coordinator
        that is away (broker restart, failover) is retried until ``broker_deadline_s``; a commit refused
        by a rebalance is not fatal."""
        pending = self.offsets.pending_commits(only)
        if not pending:
            return
        offsets = [TopicPartition(t, p, off) for (t, p), off in pending.items()]
        give_up = time.monotonic() + self.broker_deadline_s
        while True:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
                break
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is not None and err.code() in GENERATION_LOST:
                    # Published but not committed: whoever owns the partitions after the rebalance (maybe
                    # us again) re-reads from the last commit. A re-publish, never a loss.
                    log.warning("commit_lost_to_rebalance", error=err.str(), partitions=len(offsets))
                    self.sensor.on_commit_lost()
                    return
                if err is None or err.code() not in COORDINATOR_AWAY or time.monotonic() > give_up:
                    raise
                log.warning("commit_retrying", error=err.str())
                self._stop.wait(COMMIT_RETRY_S)  # backoff, not synchronization
        self.offsets.mark_committed(pending)
        self._committed()

    def commit_transaction(self) -> None:
        """Exactly-once: the interval's outputs and the consumed offsets in one transaction. All become
        visible to read_committed readers together, or none do (a crash leaves the transaction to be
        aborted on restart: ``init_transactions`` fences it)."""
        pending = self.offsets.pending_commits()
        if not pending and not self._buffer:
            self.draining = False
            return
        batch, self._buffer = self._buffer, []
        try:
            self.producer.begin_transaction()
            for job, out in batch:
                self.publisher.produce(job, out)
            if pending:
                self.producer.send_offsets_to_transaction(
                    [TopicPartition(t, p, off) for (t, p), off in pending.items()],
                    self.consumer.consumer_group_metadata(),
                    self.produce_timeout_s,
                )
            self.producer.commit_transaction(self.produce_timeout_s)
        except KafkaException as exc:
            err = kafka_error(exc)
            if err is not None and err.txn_requires_abort():
                self.producer.abort_transaction(self.produce_timeout_s)
            raise PublishError(f"transaction failed, nothing committed: {exc}") from exc
        self.draining = False
        self.publisher.raise_failures()
        self.offsets.mark_committed(pending)
        self._last = time.monotonic()
        self._committed()

    def abort_transaction(self) -> None:
        """Exactly-once: nothing of the interval was produced yet, so dropping the buffer is the abort."""
        self._buffer.clear()
        self.draining = False
        self._since.clear()

    def _committed(self) -> None:
        self.commits += 1
        self.sensor.on_commit()
        if self._since:
            done, self._since = self._since, []
            for observer in self._observers:
                observer.on_committed(done)
