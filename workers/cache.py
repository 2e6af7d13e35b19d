"""Redis verdict cache keyed by content hash. One round trip per batch; an outage degrades to misses."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import redis
import structlog

from schemas.wire import CachedVerdict, decode_cached, encode
from workers.observability.sensors import Sensor, default_sensor

log = structlog.get_logger(__name__)
KEY_PREFIX = "guardstream:verdict:v1:"
# One round trip and one reply for a whole batch of writes (a pipeline of N SETs costs N replies).
_SET_MANY = """
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ttl)
end
return #KEYS
"""


def _frame(*parts: str) -> bytes:
    """Length-prefixed UTF-8 parts: no two different part lists frame to the same bytes.

    ``surrogatepass``: the decoder refuses lone surrogates (``schemas.codec``), but the hasher must be
    total on any ``str`` — a crash here would stop the stream on every restart. For valid text the bytes
    are exactly UTF-8 (the handler only runs on an error), so existing cache keys are unchanged."""
    out = bytearray()
    for part in parts:
        b = part.encode("utf-8", "surrogatepass")
        out += len(b).to_bytes(8, "big")
        out += b
    return bytes(out)


class ContentKeyer:
    """sha256 over everything that determines a verdict: content, engine, model and policy versions.

    The framing is ``gs-content-v1, modality, text, *image digests, engine, model_version, policy``; the
    fixed parts are framed (and the constant prefix hashed) once per engine, not once per post."""

    def __init__(self, *, engine: str, model_version: str, policy: str) -> None:
        self._prefix = hashlib.sha256(_frame("gs-content-v1"))
        self._suffix = _frame(engine, model_version, policy)

    def __call__(self, modality: str, text: str | None, image_digests: Sequence[str] = ()) -> str:
        h = self._prefix.copy()
        h.update(_frame(modality, text or "", *image_digests) + self._suffix)
        return h.hexdigest()


class CircuitBreaker:
    """Closed → (a failure) → open for ``cooldown_s`` (every call skipped at no cost) → one trial call →
    closed on success, open again for twice as long (up to ``max_cooldown_s``) on failure.

    Why: a Redis that *hangs* (SIGSTOP, a full network buffer, a failover in progress) costs every call
    its full socket timeout. Without a breaker a batch waits that long twice (MGET, then SET), and
    throughput fell from ~200 to 8 posts/s in issue 13; with it, one slow call per cool-down."""

    def __init__(
        self,
        cooldown_s: float,
        max_cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        sensor: Sensor | None = None,
    ) -> None:
        """``sensor`` is told when the breaker opens and closes, and about each skipped call."""
        self._sensor = sensor if sensor is not None else default_sensor()
        self._base = cooldown_s
        self._max = max_cooldown_s
        self._cooldown = cooldown_s
        self._clock = clock
        self._open_until: float | None = None

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def allow(self) -> bool:
        if self._open_until is None:
            return True
        if self._clock() >= self._open_until:
            return True  # half-open: this one call is the trial
        self._sensor.on_cache_skipped()
        return False

    def success(self) -> None:
        if self._open_until is not None:
            log.info("redis_breaker_closed")
            self._sensor.on_cache_breaker(False)
        self._open_until = None
        self._cooldown = self._base

    def failure(self) -> None:
        if self._open_until is not None:  # a failed trial: back off further
            self._cooldown = min(self._cooldown * 2, self._max)
        self._open_until = self._clock() + self._cooldown
        self._sensor.on_cache_breaker(True)
        log.warning("redis_breaker_open", cooldown_s=round(self._cooldown, 3))


class VerdictStore(Protocol):
    """What the pipeline needs from a verdict cache (``VerdictCache``;
    ``workers.testing.InMemoryVerdictCache``). Neither call raises for an outage: it degrades to misses."""

    def get_many(self, keys: Sequence[str]) -> list[CachedVerdict | None]: ...

    def put_many(self, entries: Sequence[tuple[str, CachedVerdict]]) -> None: ...

    def close(self) -> None: ...


class VerdictCache:
    """``socket_timeout_s`` is short on purpose: a cache lookup is worth a few milliseconds, never a
    stalled batch. A failure opens the circuit breaker: the cache is skipped (misses, no writes) until a
    trial call after the cool-down succeeds. ``sensor`` (default: the process-wide Prometheus sensor) is
    told about Redis errors and the breaker; ``clock`` drives the breaker's cool-down."""

    def __init__(
        self,
        url: str,
        ttl_s: int,
        enabled: bool = True,
        *,
        socket_timeout_s: float = 0.25,
        cooldown_s: float = 5.0,
        max_cooldown_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sensor: Sensor | None = None,
    ) -> None:
        self._sensor = sensor if sensor is not None else default_sensor()
        self._ttl = ttl_s
        self._enabled = enabled
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        self._set_many = self._client.register_script(_SET_MANY)
        self._healthy = True
        self.breaker = CircuitBreaker(cooldown_s, max_cooldown_s, clock, sensor=self._sensor)

    def _mark(self, ok: bool, exc: Exception | None = None) -> None:
        if ok and not self._healthy:
            log.info("redis_recovered")
        elif not ok and self._healthy:
            log.warning("redis_unavailable_moderating_without_cache", error=str(exc))
        if ok:
            self.breaker.success()
        else:
            self._sensor.on_cache_error()
            self.breaker.failure()
        self._healthy = ok

    def get_many(self, keys: Sequence[str]) -> list[CachedVerdict | None]:
        if not self._enabled or not keys or not self.breaker.allow():
            return [None] * len(keys)
        try:
            raw = self._client.mget([KEY_PREFIX + k for k in keys])
        except redis.RedisError as exc:
            self._mark(False, exc)
            return [None] * len(keys)
        self._mark(True)
        return [decode_cached(r) if r is not None else None for r in raw]

    def put_many(self, entries: Sequence[tuple[str, CachedVerdict]]) -> None:
        """Idempotent: the same key always maps to the same verdict, so re-writes are harmless."""
        if not self._enabled or not entries or not self.breaker.allow():
            return
        try:
            self._set_many(
                keys=[KEY_PREFIX + k for k, _ in entries],
                args=[self._ttl, *(encode(v) for _, v in entries)],
            )
        except redis.RedisError as exc:
            self._mark(False, exc)
            return
        self._mark(True)

    def close(self) -> None:
        self._client.close()
