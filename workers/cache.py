"""Redis verdict cache keyed by content hash. One round trip per batch; an outage degrades to misses."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import redis
import structlog

from schemas.wire import CachedVerdict, decode_cached, encode
from workers import metrics

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


class VerdictCache:
    def __init__(self, url: str, ttl_s: int, enabled: bool = True) -> None:
        self._ttl = ttl_s
        self._enabled = enabled
        self._client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._set_many = self._client.register_script(_SET_MANY)
        self._healthy = True

    def _mark(self, ok: bool, exc: Exception | None = None) -> None:
        if ok and not self._healthy:
            log.info("redis_recovered")
        elif not ok and self._healthy:
            log.warning("redis_unavailable_moderating_without_cache", error=str(exc))
        if not ok:
            metrics.CACHE_ERRORS.inc()
        self._healthy = ok

    def get_many(self, keys: Sequence[str]) -> list[CachedVerdict | None]:
        if not self._enabled or not keys:
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
        if not self._enabled or not entries:
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
