"""Prometheus metrics and the worker's HTTP endpoints: ``/metrics``, ``/healthz`` (liveness: the main
loop turned recently), ``/readyz`` (readiness: partitions assigned and engine and S3 available; a member
with zero partitions answers 503 "idle: no partitions assigned").

The core (``workers.pipeline``, ``workers.cache``, ``workers.kafka``) never touches these objects: it reports
events to an injected ``workers.observability.sensors.Sensor``, and ``PrometheusSensor`` (the default)
turns them into updates of the metrics below (``tests/unit/test_layering.py`` keeps it that way)."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

CONSUMED = Counter("guardstream_consumed_total", "Posts consumed from the posts topic")
MODERATED = Counter("guardstream_moderated_total", "Verdicts published", ["engine", "outcome"])
CACHE_HITS = Counter("guardstream_cache_hits_total", "Verdict cache hits")
CACHE_MISSES = Counter("guardstream_cache_misses_total", "Verdict cache misses")
CACHE_ERRORS = Counter("guardstream_cache_errors_total", "Redis errors (moderation continued without cache)")
DEAD_LETTERS = Counter("guardstream_dead_letters_total", "Posts dead-lettered", ["error_code"])
NOVEL_RISKS = Counter("guardstream_novel_risks_total", "Verdicts carrying a novel-risk description")
ENGINE_FAILURES = Counter("guardstream_engine_failures_total", "Engine request failures (before retry)")
BATCH_SIZE = Histogram(
    "guardstream_engine_batch_size", "Items per engine call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
ENGINE_LATENCY = Histogram("guardstream_engine_latency_seconds", "Engine request latency (one post)")
E2E_LATENCY = Histogram(
    "guardstream_e2e_latency_seconds",
    "Post created_at to verdict decided",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
IN_FLIGHT = Gauge("guardstream_in_flight", "Posts in the engine or held back by an outage")
CONSUMER_LAG = Gauge("guardstream_consumer_lag", "Records behind the partition end", ["topic", "partition"])
COMMITS = Counter("guardstream_commits_total", "Offset commits after acknowledged publishes")
COMMITS_LOST = Counter(
    "guardstream_commits_lost_to_rebalance_total", "Published batches whose commit a rebalance refused"
)
BROKER_DOWN_SECONDS = Gauge(
    "guardstream_broker_down_seconds", "How long the broker has been unreachable (0: up)"
)
PAUSED_PARTITIONS = Gauge("guardstream_paused_partitions", "Partitions paused for backpressure")
MAX_IN_FLIGHT = Gauge("guardstream_max_in_flight", "Engine requests the worker keeps outstanding at most")
IMAGE_BUDGET_USED = Gauge(
    "guardstream_image_budget_used_bytes",
    "Normalised image bytes admitted posts hold, decode to outcome (INFLIGHT_IMAGE_BYTES budget)",
)
IMAGE_BUDGET_CAPACITY = Gauge(
    "guardstream_image_budget_capacity_bytes", "GUARDSTREAM_INFLIGHT_IMAGE_BYTES: the image budget's size"
)
IMAGE_POSTS_WAITING = Gauge(
    "guardstream_image_posts_waiting", "Decoded image posts waiting, unfetched, for room in the image budget"
)
ENGINE_TIMEOUTS = Counter(
    "guardstream_engine_timeouts_total", "Engine requests that did not answer within ENGINE_TIMEOUT_S"
)
OUTPUTS_TRIMMED = Counter(
    "guardstream_outputs_trimmed_total", "Outputs re-sent smaller after the broker refused them as too large"
)
IDLE_WITH_LAG = Gauge(
    "guardstream_idle_member_with_lag", "1 while this member holds no partitions and the group has lag"
)
CACHE_BREAKER_OPEN = Gauge(
    "guardstream_cache_breaker_open", "1 while the Redis circuit breaker is open (cache skipped)"
)
CACHE_SKIPPED = Counter(
    "guardstream_cache_skipped_total", "Cache calls skipped because the Redis circuit breaker was open"
)


def observe_many(hist: Histogram, values: Sequence[float]) -> None:
    """``hist.observe(v)`` for each value, with one locked update per bucket instead of per value.

    prometheus-client has no bulk observe; this adds the per-bucket counts (a value lands in the first
    bucket whose upper bound is >= it, as ``observe`` does) and the sum to the histogram's own counters.
    Those are private attributes, so ``tests/unit/test_metrics.py`` checks the exposition against per-value
    ``observe`` on every run: a prometheus-client that changes them fails that test, not production.
    """
    if not values:
        return
    bounds: list[float] = hist._upper_bounds
    counts = [0] * len(bounds)
    for v in values:
        if v == v:  # observe() counts NaN in the sum and in no bucket
            counts[bisect.bisect_left(bounds, v)] += 1
    hist._sum.inc(sum(values))
    for bucket, k in zip(hist._buckets, counts, strict=True):
        if k:
            bucket.inc(k)


class Health:
    """Shared liveness/readiness state, updated by the worker loop."""

    def __init__(self, stale_after_s: float = 120.0) -> None:
        self.stale_after_s = stale_after_s
        self.last_beat = time.monotonic()
        self.ready = False
        self.reason = "starting"
        self._lock = threading.Lock()

    def set_ready(self, ready: bool, reason: str) -> None:
        """Ready: partitions assigned and every dependency up. Not ready says why ("idle: no partitions
        assigned", "engine unavailable", ...), in the /readyz body."""
        with self._lock:
            self.ready, self.reason = ready, reason

    def beat(self) -> None:
        with self._lock:
            self.last_beat = time.monotonic()

    def alive(self) -> bool:
        with self._lock:
            return time.monotonic() - self.last_beat < self.stale_after_s


HEALTH = Health()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *_a: Any) -> None:
        pass

    def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/metrics"):
            self._reply(200, generate_latest(), CONTENT_TYPE_LATEST)
        elif self.path == "/healthz":
            ok = HEALTH.alive()
            self._reply(200 if ok else 503, b"ok\n" if ok else b"main loop stalled\n")
        elif self.path == "/readyz":
            ready, reason = HEALTH.ready, HEALTH.reason
            self._reply(200 if ready else 503, b"ready\n" if ready else f"not ready: {reason}\n".encode())
        else:
            self._reply(404, b"not found\n")


def start_metrics_server(port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
