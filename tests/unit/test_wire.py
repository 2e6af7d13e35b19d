"""The hot-path encoders (msgspec) against the schema of record (pydantic): they must not drift."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.types import Verdict
from schemas.events import Modality, Scores, VerdictEvent
from schemas.wire import CachedVerdict, ScoresWire, VerdictWire, decode_cached, encode
from workers.cache import ContentKeyer

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
opt_text = st.none() | text
floats = st.none() | st.floats(allow_nan=True, allow_infinity=True)
# what a parsed post's created_at can be: naive, or aware with a whole-minute offset (RFC 3339)
tzs = st.none() | st.builds(lambda m: timezone(timedelta(minutes=m)), st.integers(-1439, 1439))
stamps = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1), timezones=tzs)


def test_verdict_wire_has_the_schema_fields_in_order() -> None:
    assert list(VerdictWire.__struct_fields__) == list(VerdictEvent.model_fields)
    assert list(ScoresWire.__struct_fields__) == list(Scores.model_fields)


def test_cached_verdict_is_a_subset_of_the_engine_verdict() -> None:
    engine_fields = {f.name for f in dataclasses.fields(Verdict)}
    assert set(CachedVerdict.__struct_fields__) <= engine_fields


@settings(max_examples=300, deadline=None)
@given(
    post_id=text,
    author_id=text,
    modality=st.sampled_from(Modality),
    safe=st.none() | st.booleans(),
    category=opt_text,
    novel_risk=opt_text,
    reasoning=opt_text,
    p_unsafe=floats,
    similarity=floats,
    cache_hit=st.booleans(),
    latency_ms=st.floats(min_value=0, max_value=1e9),
    partition=st.integers(0, 2**31 - 1),
    offset=st.integers(0, 2**63 - 1),
    created=stamps,
    decided=stamps,
)
def test_wire_json_equals_the_pydantic_json(
    post_id: str,
    author_id: str,
    modality: Modality,
    safe: bool | None,
    category: str | None,
    novel_risk: str | None,
    reasoning: str | None,
    p_unsafe: float | None,
    similarity: float | None,
    cache_hit: bool,
    latency_ms: float,
    partition: int,
    offset: int,
    created: datetime,
    decided: datetime,
) -> None:
    kw: dict[str, Any] = dict(
        post_id=post_id,
        author_id=author_id,
        modality=modality,
        safe=safe,
        category=category,
        category_name=category and f"name of {category}",
        subcategory=None,
        subcategory_name=None,
        novel_risk=novel_risk,
        abstained_reason=None if safe is not None else "cannot see images",
        reasoning=reasoning,
        raw_output=reasoning and f"<raw>{reasoning}</raw>",
        engine="proguard-vllm",
        model_version="ProGuard-7B",
        policy_version="proguard-v1",
        content_hash="0f" * 32,
        cache_hit=cache_hit,
        latency_ms=latency_ms,
        source_topic="posts",
        source_partition=partition,
        source_offset=offset,
        post_created_at=created,
        decided_at=decided,
    )
    wire = encode(VerdictWire(scores=ScoresWire(p_unsafe, similarity), **kw))
    model = VerdictEvent(scores=Scores(p_unsafe=p_unsafe, category_similarity=similarity), **kw)
    reference = model.__pydantic_serializer__.to_json(model)
    # the same JSON document (floats may be spelled differently: msgspec 1e16, pydantic 1e+16)
    assert json.loads(wire) == json.loads(reference)
    if all(x is None or 1e-4 < abs(x) < 1e15 for x in (p_unsafe, similarity, latency_ms or None)):
        assert wire == reference
    back = VerdictEvent.model_validate_json(wire)
    if all(x is None or math.isfinite(x) for x in (p_unsafe, similarity)):
        assert back == model  # non-finite scores are written as null by both, so they cannot come back


def test_cache_entries_round_trip_and_corrupt_ones_are_misses() -> None:
    v = CachedVerdict(safe=False, category="C3", subcategory="C3S2", p_unsafe=0.91, reasoning="r")
    assert decode_cached(encode(v)) == v
    # an entry written before this encoder (a JSON object with these keys) still reads
    assert decode_cached(b'{"safe": true, "p_unsafe": 0.0}') == CachedVerdict(safe=True, p_unsafe=0.0)
    for junk in (b"", b"{", b"[]", b'{"safe": "yes"}', b'{"category": "C1"}', b"\xff\xfe"):
        assert decode_cached(junk) is None, junk


def _reference_key(*parts: str) -> str:
    """The cache key's definition, written out: sha256 over 8-byte big-endian length-prefixed parts."""
    framed = b"".join(len(p.encode()).to_bytes(8, "big") + p.encode() for p in ("gs-content-v1", *parts))
    return hashlib.sha256(framed).hexdigest()


@settings(max_examples=200, deadline=None)
@given(modality=text, body=st.none() | text, digests=st.lists(text, max_size=4), engine=text, model=text)
def test_content_key_is_the_framed_sha256(
    modality: str, body: str | None, digests: list[str], engine: str, model: str
) -> None:
    keyer = ContentKeyer(engine=engine, model_version=model, policy="p1")
    expected = _reference_key(modality, body or "", *digests, engine, model, "p1")
    assert keyer(modality, body, digests) == expected


def test_content_key_separates_text_from_digests() -> None:
    keyer = ContentKeyer(engine="e", model_version="m", policy="p")
    assert keyer("text_image", "ab", ["c"]) != keyer("text_image", "a", ["bc"])
    assert keyer("text", "x") != ContentKeyer(engine="e", model_version="m", policy="p2")("text", "x")


def test_struct_encoder_rejects_wrong_types() -> None:
    """The wire structs are not validated on construction; encoding a wrong type still fails loudly."""
    bad = VerdictWire(
        post_id="p",
        author_id="a",
        modality=Modality.TEXT,
        safe=True,
        scores=ScoresWire(),
        engine="e",
        model_version="m",
        policy_version="p",
        content_hash="h",
        cache_hit=False,
        latency_ms=1.0,
        source_topic="t",
        source_partition=0,
        source_offset=0,
        post_created_at=object(),  # type: ignore[arg-type]
        decided_at=datetime(2026, 1, 1),
    )
    with pytest.raises(TypeError):
        encode(bad)
