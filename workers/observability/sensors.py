"""What the worker observes about itself, as events to an injected ``Sensor`` (faust's ``sensors/``).

The core — ``workers.pipeline`` (``Moderator``, ``EngineLoop``), ``workers.cache`` and
``workers.kafka.worker`` — takes a ``sensor`` constructor argument and reports named events to it; it
never imports the Prometheus objects (``tests/unit/test_layering.py``). ``PrometheusSensor`` (the
default: one per process, ``default_sensor()``) turns each event into updates of the metrics in
``workers.observability.metrics`` and the ``/healthz`` / ``/readyz`` state; ``RecordingSensor`` keeps them
in plain fields for tests.

Events are batch-level where the hot path is: a moderated batch is one ``on_cache`` and one
``on_outcomes`` call, whatever its size (one locked increment per label, ``observe_many`` for the
latencies), never one call per post.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import prometheus_client

from schemas.events import ErrorCode
from workers.observability import metrics
from workers.observability.metrics import HEALTH, Health, observe_many

_OUTCOME: dict[bool | None, str] = {True: "safe", False: "unsafe", None: "abstain"}


class Sensor(Protocol):
    """The events the worker reports. Implementations must be cheap and must not raise; the engine
    events (``on_engine_request``, ``on_engine_failure``, ``on_engine_timeout``) arrive on the engine
    thread, the rest on the thread that runs the moderator and the Kafka loop."""

    # the moderator (one call per batch)
    def on_engine(self, engine: str) -> None:
        """A moderator judging with ``engine`` was built (its verdict series exist from now on)."""

    def on_consumed(self, n: int) -> None:
        """``n`` records were taken in to be decoded."""

    def on_cache(self, hits: int, misses: int) -> None:
        """A batch was finished: ``hits`` answered by the verdict cache, ``misses`` by the engine."""

    def on_outcomes(
        self,
        engine: str,
        verdicts: Mapping[bool | None, int],
        dead_letters: Mapping[ErrorCode, int],
        novel_risks: int,
        e2e_latencies_s: Sequence[float],
    ) -> None:
        """A batch's outcomes were built: verdicts by ``safe`` (True, False, None: abstained), dead
        letters by code, verdicts carrying a novel risk, and post ``created_at`` → decision per verdict."""

    # the engine
    def on_engine_request(self, latency_s: float) -> None:
        """One post's engine request answered (the streaming path)."""

    def on_engine_batch(self, size: int, latency_s: float) -> None:
        """One engine call on ``size`` posts answered (the batch path: replay, offline tools)."""

    def on_engine_failure(self) -> None:
        """An engine request or batch failed (before its retry)."""

    def on_engine_timeout(self) -> None:
        """An engine request did not answer within ``ENGINE_TIMEOUT_S``."""

    # the verdict cache
    def on_cache_error(self) -> None:
        """A Redis call failed (moderation goes on without the cache)."""

    def on_cache_breaker(self, is_open: bool) -> None:
        """The Redis circuit breaker opened (True) or closed again (False)."""

    def on_cache_skipped(self) -> None:
        """A cache call was skipped because the breaker is open."""

    # the Kafka loop
    def on_beat(self) -> None:
        """The main loop turned (liveness)."""

    def on_ready(self, ready: bool, reason: str) -> None:
        """Readiness changed or was re-evaluated; ``reason`` says why not ("idle: ...", "stopped")."""

    def on_max_in_flight(self, n: int) -> None:
        """The window's size: engine requests kept outstanding at most."""

    def on_in_flight(self, n: int) -> None:
        """Posts in the engine or held back (outage, image budget)."""

    def on_image_budget(self, used_bytes: int, capacity_bytes: int, waiting: int) -> None:
        """The image budget (``INFLIGHT_IMAGE_BYTES``): bytes admitted posts hold, its size, and the image
        posts waiting for room (admission is stopped while any wait)."""

    def on_paused(self, partitions: int) -> None:
        """Partitions paused for backpressure (0: resumed)."""

    def on_output_trimmed(self) -> None:
        """An output the broker refused as too large was re-sent smaller."""

    def on_commit(self) -> None:
        """Offsets were committed (or a transaction with them)."""

    def on_commit_lost(self) -> None:
        """A commit was refused by a rebalance (re-published later, never lost)."""

    def on_broker_down(self, seconds: float) -> None:
        """How long the broker has been unreachable (0: reachable again)."""

    def on_lag(self, topic: str, partition: int, lag: int) -> None:
        """Records behind the end of an owned partition."""

    def on_idle_with_lag(self, idle_with_lag: bool) -> None:
        """Whether this member holds no partitions while the group has lag."""


class PrometheusSensor:
    """Events → the Prometheus metrics (names, labels and meaning unchanged: the dashboard and the alert
    rules use them) and the ``Health`` the HTTP endpoints serve."""

    def __init__(self, health: Health = HEALTH) -> None:
        self.health = health
        # labelled children, looked up once (``labels()`` takes a lock and builds a key per call)
        self._moderated: dict[tuple[str, bool | None], prometheus_client.Counter] = {}
        self._dead_letters: dict[ErrorCode, prometheus_client.Counter] = {}

    def _verdicts(self, engine: str, safe: bool | None) -> prometheus_client.Counter:
        child = self._moderated.get((engine, safe))
        if child is None:
            child = self._moderated[(engine, safe)] = metrics.MODERATED.labels(engine, _OUTCOME[safe])
        return child

    def on_engine(self, engine: str) -> None:
        for safe in _OUTCOME:
            self._verdicts(engine, safe)

    def on_consumed(self, n: int) -> None:
        metrics.CONSUMED.inc(n)

    def on_cache(self, hits: int, misses: int) -> None:
        if hits:
            metrics.CACHE_HITS.inc(hits)
        if misses:
            metrics.CACHE_MISSES.inc(misses)

    def on_outcomes(
        self,
        engine: str,
        verdicts: Mapping[bool | None, int],
        dead_letters: Mapping[ErrorCode, int],
        novel_risks: int,
        e2e_latencies_s: Sequence[float],
    ) -> None:
        observe_many(metrics.E2E_LATENCY, e2e_latencies_s)
        for safe, k in verdicts.items():
            self._verdicts(engine, safe).inc(k)
        for code, k in dead_letters.items():
            child = self._dead_letters.get(code)
            if child is None:
                child = self._dead_letters[code] = metrics.DEAD_LETTERS.labels(code.value)
            child.inc(k)
        if novel_risks:
            metrics.NOVEL_RISKS.inc(novel_risks)

    def on_engine_request(self, latency_s: float) -> None:
        metrics.ENGINE_LATENCY.observe(latency_s)

    def on_engine_batch(self, size: int, latency_s: float) -> None:
        metrics.ENGINE_LATENCY.observe(latency_s)
        metrics.BATCH_SIZE.observe(size)

    def on_engine_failure(self) -> None:
        metrics.ENGINE_FAILURES.inc()

    def on_engine_timeout(self) -> None:
        metrics.ENGINE_TIMEOUTS.inc()

    def on_cache_error(self) -> None:
        metrics.CACHE_ERRORS.inc()

    def on_cache_breaker(self, is_open: bool) -> None:
        metrics.CACHE_BREAKER_OPEN.set(1 if is_open else 0)

    def on_cache_skipped(self) -> None:
        metrics.CACHE_SKIPPED.inc()

    def on_beat(self) -> None:
        self.health.beat()

    def on_ready(self, ready: bool, reason: str) -> None:
        self.health.set_ready(ready, reason)

    def on_max_in_flight(self, n: int) -> None:
        metrics.MAX_IN_FLIGHT.set(n)

    def on_in_flight(self, n: int) -> None:
        metrics.IN_FLIGHT.set(n)

    def on_image_budget(self, used_bytes: int, capacity_bytes: int, waiting: int) -> None:
        metrics.IMAGE_BUDGET_USED.set(used_bytes)
        metrics.IMAGE_BUDGET_CAPACITY.set(capacity_bytes)
        metrics.IMAGE_POSTS_WAITING.set(waiting)

    def on_paused(self, partitions: int) -> None:
        metrics.PAUSED_PARTITIONS.set(partitions)

    def on_output_trimmed(self) -> None:
        metrics.OUTPUTS_TRIMMED.inc()

    def on_commit(self) -> None:
        metrics.COMMITS.inc()

    def on_commit_lost(self) -> None:
        metrics.COMMITS_LOST.inc()

    def on_broker_down(self, seconds: float) -> None:
        metrics.BROKER_DOWN_SECONDS.set(seconds)

    def on_lag(self, topic: str, partition: int, lag: int) -> None:
        metrics.CONSUMER_LAG.labels(topic, str(partition)).set(lag)

    def on_idle_with_lag(self, idle_with_lag: bool) -> None:
        metrics.IDLE_WITH_LAG.set(1 if idle_with_lag else 0)


_DEFAULT = PrometheusSensor()


def default_sensor() -> Sensor:
    """The process-wide Prometheus sensor: what the core reports to when it is given no sensor."""
    return _DEFAULT


@dataclass
class RecordingSensor:
    """Keeps every event in plain fields, for tests (thread-safe: the engine events come from the engine
    thread). Counts are totals; gauges and one-off events are lists of the values reported, in order."""

    engines: list[str] = field(default_factory=list)
    consumed: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    verdicts: Counter[tuple[str, bool | None]] = field(default_factory=Counter)  # (engine, safe)
    dead_letters: Counter[ErrorCode] = field(default_factory=Counter)
    novel_risks: int = 0
    e2e_latencies_s: list[float] = field(default_factory=list)
    outcome_batches: int = 0  # on_outcomes calls
    engine_requests_s: list[float] = field(default_factory=list)
    engine_batches: list[tuple[int, float]] = field(default_factory=list)  # (size, latency_s)
    engine_failures: int = 0
    engine_timeouts: int = 0
    cache_errors: int = 0
    cache_breaker: list[bool] = field(default_factory=list)
    cache_skipped: int = 0
    beats: int = 0
    ready: list[tuple[bool, str]] = field(default_factory=list)
    max_in_flight: list[int] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    image_budget: list[tuple[int, int, int]] = field(default_factory=list)  # (used, capacity, waiting)
    paused: list[int] = field(default_factory=list)
    outputs_trimmed: int = 0
    commits: int = 0
    commits_lost: int = 0
    broker_down_s: list[float] = field(default_factory=list)
    lag: list[tuple[str, int, int]] = field(default_factory=list)  # (topic, partition, lag)
    idle_with_lag: list[bool] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def on_engine(self, engine: str) -> None:
        with self._lock:
            self.engines.append(engine)

    def on_consumed(self, n: int) -> None:
        with self._lock:
            self.consumed += n

    def on_cache(self, hits: int, misses: int) -> None:
        with self._lock:
            self.cache_hits += hits
            self.cache_misses += misses

    def on_outcomes(
        self,
        engine: str,
        verdicts: Mapping[bool | None, int],
        dead_letters: Mapping[ErrorCode, int],
        novel_risks: int,
        e2e_latencies_s: Sequence[float],
    ) -> None:
        with self._lock:
            self.outcome_batches += 1
            for safe, k in verdicts.items():
                self.verdicts[(engine, safe)] += k
            self.dead_letters.update(dead_letters)
            self.novel_risks += novel_risks
            self.e2e_latencies_s.extend(e2e_latencies_s)

    def on_engine_request(self, latency_s: float) -> None:
        with self._lock:
            self.engine_requests_s.append(latency_s)

    def on_engine_batch(self, size: int, latency_s: float) -> None:
        with self._lock:
            self.engine_batches.append((size, latency_s))

    def on_engine_failure(self) -> None:
        with self._lock:
            self.engine_failures += 1

    def on_engine_timeout(self) -> None:
        with self._lock:
            self.engine_timeouts += 1

    def on_cache_error(self) -> None:
        with self._lock:
            self.cache_errors += 1

    def on_cache_breaker(self, is_open: bool) -> None:
        with self._lock:
            self.cache_breaker.append(is_open)

    def on_cache_skipped(self) -> None:
        with self._lock:
            self.cache_skipped += 1

    def on_beat(self) -> None:
        with self._lock:
            self.beats += 1

    def on_ready(self, ready: bool, reason: str) -> None:
        with self._lock:
            self.ready.append((ready, reason))

    def on_max_in_flight(self, n: int) -> None:
        with self._lock:
            self.max_in_flight.append(n)

    def on_in_flight(self, n: int) -> None:
        with self._lock:
            self.in_flight.append(n)

    def on_image_budget(self, used_bytes: int, capacity_bytes: int, waiting: int) -> None:
        with self._lock:
            self.image_budget.append((used_bytes, capacity_bytes, waiting))

    def on_paused(self, partitions: int) -> None:
        with self._lock:
            self.paused.append(partitions)

    def on_output_trimmed(self) -> None:
        with self._lock:
            self.outputs_trimmed += 1

    def on_commit(self) -> None:
        with self._lock:
            self.commits += 1

    def on_commit_lost(self) -> None:
        with self._lock:
            self.commits_lost += 1

    def on_broker_down(self, seconds: float) -> None:
        with self._lock:
            self.broker_down_s.append(seconds)

    def on_lag(self, topic: str, partition: int, lag: int) -> None:
        with self._lock:
            self.lag.append((topic, partition, lag))

    def on_idle_with_lag(self, idle_with_lag: bool) -> None:
        with self._lock:
            self.idle_with_lag.append(idle_with_lag)
