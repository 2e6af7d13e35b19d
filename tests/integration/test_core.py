"""The transport-agnostic Moderator against the real S3 server and Redis (no Kafka, no threads), with the
CPU engine. What needs no service (decode errors, bisection, parse-error policy, cache and media
semantics) is tested with fakes in ``tests/unit/test_moderator.py``."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from guard.engines.cpu.engine import CpuEngine
from guard.parser import format_output
from guard.prompts import PromptSet
from guard.samples import drawn_image, png_bytes
from schemas.events import VerdictEvent
from tests.conftest import BUCKET, Services
from tests.engines import RawOutputEngine
from workers.demo.sample_feed import post
from workers.pipeline.moderator import Moderator
from workers.pipeline.records import Record
from workers.settings import Settings
from workers.wiring import build_moderator

pytestmark = pytest.mark.integration


def records(values: list[bytes], topic: str = "posts") -> list[Record]:
    return [Record(topic, 0, i, None, v) for i, v in enumerate(values)]


def texts(*ts: str) -> list[bytes]:
    tag = uuid.uuid4().hex[:6]
    return [post(f"{tag}-{i}", "a", f"{t} [{tag}]") for i, t in enumerate(ts)]


def test_verdicts_cache_and_novel_routing(
    kafka_settings: Settings, cpu_engine: CpuEngine, services: Services
) -> None:
    key = f"{uuid.uuid4().hex}/p.png"
    services.s3_client().put_object(Bucket=BUCKET, Key=key, Body=png_bytes(drawn_image(7)))
    values = texts("Lovely sunset at the lake", "Buy cocaine and MDMA here, fast discreet shipping")
    values.append(post(f"img-{uuid.uuid4().hex[:6]}", "a", None, [f"s3://{BUCKET}/{key}"]))
    m = build_moderator(kafka_settings, cpu_engine)
    first = m.process(records(values))
    assert [o.kind for o in first] == ["verdict"] * 3
    evs = [o.event for o in first]
    assert all(isinstance(e, VerdictEvent) for e in evs)
    safe, unsafe, image = evs
    assert (
        isinstance(safe, VerdictEvent)
        and isinstance(unsafe, VerdictEvent)
        and isinstance(image, VerdictEvent)
    )
    assert safe.safe is True and unsafe.safe is False and unsafe.category == "C8"
    assert image.safe is None and image.modality.value == "image"
    assert not any(e.cache_hit for e in (safe, unsafe, image))
    assert {o.topic for o in first[1].outputs} == {kafka_settings.verdicts_topic}
    # second pass over identical content: every verdict comes from Redis, identical decisions
    again = m.process(records(values))
    for a, b in zip(first, again, strict=True):
        assert isinstance(b.event, VerdictEvent) and isinstance(a.event, VerdictEvent)
        assert b.event.cache_hit and b.event.content_hash == a.event.content_hash
        assert (b.event.safe, b.event.subcategory) == (a.event.safe, a.event.subcategory)
    m.close()


def test_content_hash_depends_on_image_bytes_and_policy(
    kafka_settings: Settings, cpu_engine: CpuEngine, services: Services, prompts: PromptSet
) -> None:
    s3 = services.s3_client()
    k1, k2 = f"{uuid.uuid4().hex}/a.png", f"{uuid.uuid4().hex}/b.png"
    s3.put_object(Bucket=BUCKET, Key=k1, Body=png_bytes(drawn_image(1)))
    s3.put_object(Bucket=BUCKET, Key=k2, Body=png_bytes(drawn_image(2)))
    vals = [
        post("x1", "a", "same text", [f"s3://{BUCKET}/{k1}"]),
        post("x2", "a", "same text", [f"s3://{BUCKET}/{k2}"]),
    ]
    m = Moderator(kafka_settings, cpu_engine, build_moderator(kafka_settings, cpu_engine).fetcher, None)
    p = m.prepare(records(vals))
    assert p[0].key != p[1].key
    other = RawOutputEngine(prompts, lambda it, n: format_output(unsafe=False))
    other.policy_version = "other-policy"
    assert Moderator(kafka_settings, other, m.fetcher, None).prepare(records(vals[:1]))[0].key != p[0].key


def test_cache_entries_have_ttl(kafka_settings: Settings, cpu_engine: CpuEngine, services: Services) -> None:
    m = build_moderator(kafka_settings.model_copy(update={"cache_ttl_s": 123}), cpu_engine)
    (o,) = m.process(records(texts("Lovely sunset at the lake")))
    assert isinstance(o.event, VerdictEvent)
    r = redis.Redis.from_url(services.redis_url)
    ttl = r.ttl(f"guardstream:verdict:v1:{o.event.content_hash}")
    assert 0 < ttl <= 123
    cached = json.loads(r.get(f"guardstream:verdict:v1:{o.event.content_hash}") or b"{}")
    assert cached["safe"] is o.event.safe is True
    assert cached["p_unsafe"] == o.event.scores.p_unsafe
