"""Redis verdict cache keyed by content hash. One round trip per batch; an outage degrades to misses."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis
import structlog
from pydantic_core import from_json, to_json

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


def content_key(
    *,
    modality: str,
    text: str | None,
    image_digests: Sequence[str],
    engine: str,
    model_version: str,
    policy: str,
) -> str:
    """sha256 over everything that determines a verdict: content, engine, model and policy versions."""
    parts = [
        p.encode("utf-8")
        for p in ("gs-content-v1", modality, text or "", *image_digests, engine, model_version, policy)
    ]
    framed = b"".join(len(b).to_bytes(8, "big") + b for b in parts)  # length-prefixed: no ambiguity
    return hashlib.sha256(framed).hexdigest()


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

    def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        if not self._enabled or not keys:
            return [None] * len(keys)
        try:
            raw = self._client.mget([KEY_PREFIX + k for k in keys])
        except redis.RedisError as exc:
            self._mark(False, exc)
            return [None] * len(keys)
        self._mark(True)
        out: list[dict[str, Any] | None] = []
        for r in raw:
            try:
                out.append(from_json(r) if r is not None else None)
            except (ValueError, TypeError):
                out.append(None)
        return out

    def put_many(self, entries: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Idempotent: the same key always maps to the same verdict, so re-writes are harmless."""
        if not self._enabled or not entries:
            return
        try:
            self._set_many(
                keys=[KEY_PREFIX + k for k, _ in entries],
                args=[self._ttl, *(to_json(v) for _, v in entries)],
            )
        except redis.RedisError as exc:
            self._mark(False, exc)
            return
        self._mark(True)

    def close(self) -> None:
        self._client.close()
