"""Hot-path encoders for the worker's per-post JSON (msgspec).

``VerdictEvent`` (pydantic, in ``events.py``) is the schema of record: its JSON schema is the one in
``schemas/json/``, and every reader (replay, alerts, training export, downstream consumers) validates
with it. Building and validating one pydantic model per post cost the worker ~4x the encode itself, so
the worker writes verdicts through ``VerdictWire``: the same fields, in the same order, with the same
JSON types, encoded by msgspec without re-validating values the worker computed itself.
``tests/unit/test_wire.py`` pins the two together: same field names and order, and for generated verdicts
the wire bytes are byte-identical to pydantic's and validate back into an equal ``VerdictEvent``.

``CachedVerdict`` is the Redis cache entry (the verdict, without anything about the post that got it).
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from schemas.events import Modality


class ScoresWire(msgspec.Struct):
    p_unsafe: float | None = None
    category_similarity: float | None = None


class VerdictWire(msgspec.Struct, kw_only=True):
    """Field for field ``VerdictEvent`` (schema v1)."""

    schema_version: int = 1
    post_id: str
    author_id: str
    modality: Modality
    safe: bool | None
    category: str | None = None
    category_name: str | None = None
    subcategory: str | None = None
    subcategory_name: str | None = None
    novel_risk: str | None = None
    abstained_reason: str | None = None
    parse_error: bool = False
    reasoning: str | None = None
    raw_output: str | None = None
    scores: ScoresWire
    engine: str
    model_version: str
    policy_version: str
    content_hash: str
    cache_hit: bool
    latency_ms: float
    source_topic: str
    source_partition: int
    source_offset: int
    post_created_at: datetime
    decided_at: datetime


class CachedVerdict(msgspec.Struct):
    """A verdict as stored in Redis under its content hash (key prefix ``guardstream:verdict:v1:``)."""

    safe: bool | None
    category: str | None = None
    subcategory: str | None = None
    novel_risk: str | None = None
    p_unsafe: float | None = None
    category_similarity: float | None = None
    reasoning: str | None = None
    raw_output: str | None = None
    abstained_reason: str | None = None


_encoder = msgspec.json.Encoder()
_cached_decoder = msgspec.json.Decoder(CachedVerdict)


def encode(obj: VerdictWire | CachedVerdict) -> bytes:
    return _encoder.encode(obj)


def decode_cached(raw: bytes | str) -> CachedVerdict | None:
    """A cache entry, or None for anything that is not one (a corrupt entry is a miss, not a crash)."""
    try:
        return _cached_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
