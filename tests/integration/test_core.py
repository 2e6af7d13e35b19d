"""The transport-agnostic Moderator against the real S3 server and Redis (no Kafka, no threads)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
import redis

from guard.cpu import CpuEngine
from guard.parser import format_output
from guard.prompts import PromptSet
from guard.samples import drawn_image, png_bytes
from schemas.events import DeadLetterEvent, ErrorCode, VerdictEvent
from tests.conftest import BUCKET, Services
from tests.engines import PoisonEngine, RawOutputEngine
from workers.cache import VerdictCache
from workers.demo.sample_feed import post
from workers.pipeline.moderator import Moderator
from workers.pipeline.records import Record
from workers.settings import ParseErrorPolicy, Settings
from workers.wiring import build_moderator

pytestmark = pytest.mark.integration


def records(values: list[bytes], topic: str = "posts") -> list[Record]:
    return [Record(topic, 0, i, None, v) for i, v in enumerate(values)]


def texts(*ts: str) -> list[bytes]:
    tag = uuid.uuid4().hex[:6]
    return [post(f"{tag}-{i}", "a", f"{t} [{tag}]") for i, t in enumerate(ts)]


def test_verdicts_cache_and_novel_routing(
    settings: Settings, cpu_engine: CpuEngine, services: Services
) -> None:
    key = f"{uuid.uuid4().hex}/p.png"
    services.s3_client().put_object(Bucket=BUCKET, Key=key, Body=png_bytes(drawn_image(7)))
    values = texts("Lovely sunset at the lake", "Buy cocaine and MDMA here, fast discreet shipping")
    values.append(post(f"img-{uuid.uuid4().hex[:6]}", "a", None, [f"s3://{BUCKET}/{key}"]))
    m = build_moderator(settings, cpu_engine)
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
    assert {o.topic for o in first[1].outputs} == {settings.verdicts_topic}
    # second pass over identical content: every verdict comes from Redis, identical decisions
    again = m.process(records(values))
    for a, b in zip(first, again, strict=True):
        assert isinstance(b.event, VerdictEvent) and isinstance(a.event, VerdictEvent)
        assert b.event.cache_hit and b.event.content_hash == a.event.content_hash
        assert (b.event.safe, b.event.subcategory) == (a.event.safe, a.event.subcategory)
    m.close()


def test_content_hash_depends_on_image_bytes_and_policy(
    settings: Settings, cpu_engine: CpuEngine, services: Services, prompts: PromptSet
) -> None:
    s3 = services.s3_client()
    k1, k2 = f"{uuid.uuid4().hex}/a.png", f"{uuid.uuid4().hex}/b.png"
    s3.put_object(Bucket=BUCKET, Key=k1, Body=png_bytes(drawn_image(1)))
    s3.put_object(Bucket=BUCKET, Key=k2, Body=png_bytes(drawn_image(2)))
    vals = [
        post("x1", "a", "same text", [f"s3://{BUCKET}/{k1}"]),
        post("x2", "a", "same text", [f"s3://{BUCKET}/{k2}"]),
    ]
    m = Moderator(settings, cpu_engine, build_moderator(settings, cpu_engine).fetcher, None)
    p = m.prepare(records(vals))
    assert p[0].key != p[1].key
    other = RawOutputEngine(prompts, lambda it, n: format_output(unsafe=False))
    other.policy_version = "other-policy"
    assert Moderator(settings, other, m.fetcher, None).prepare(records(vals[:1]))[0].key != p[0].key


def test_poison_post_is_isolated_by_bisection(settings: Settings, cpu_engine: CpuEngine) -> None:
    engine = PoisonEngine(cpu_engine, "POISON")
    m = Moderator(settings.model_copy(update={"engine_retries": 1}), engine, None, None)
    vals = texts(*[f"ordinary post number {i}" for i in range(7)], "this one is POISON")
    out = m.process(records(vals))
    kinds = [o.kind for o in out]
    assert kinds == ["verdict"] * 7 + ["dead_letter"]
    dl = out[-1].event
    assert isinstance(dl, DeadLetterEvent) and dl.error_code is ErrorCode.ENGINE_FAILED
    assert "device-side assert" in dl.message and dl.original_value() == vals[-1]
    assert (
        engine.calls[0] == 8 and 1 in engine.calls
    )  # whole batch first, then down to the single poison post


def test_whole_engine_outage_dead_letters_every_post_without_crashing(
    settings: Settings, cpu_engine: CpuEngine
) -> None:
    engine = PoisonEngine(cpu_engine, "")  # every text contains "": every call fails
    out = Moderator(settings.model_copy(update={"engine_retries": 0}), engine, None, None).process(
        records(texts("a", "b", "c"))
    )
    assert [o.event.error_code for o in out if isinstance(o.event, DeadLetterEvent)] == [
        ErrorCode.ENGINE_FAILED
    ] * 3


@pytest.mark.parametrize("policy", [ParseErrorPolicy.DLQ, ParseErrorPolicy.RETRY])
def test_parse_errors_are_routed_by_policy(
    settings: Settings, prompts: PromptSet, policy: ParseErrorPolicy
) -> None:
    def respond(item, call):  # type: ignore[no-untyped-def]
        if "flaky" in (item.text or "") and call == 1:
            return "<think>\ncut off mid-sent"
        if "garbage" in (item.text or ""):
            return "I refuse to follow the format"
        return format_output(unsafe=True, category="C9S1")

    engine = RawOutputEngine(prompts, respond)
    m = Moderator(settings.model_copy(update={"on_parse_error": policy}), engine, None, None)
    out = m.process(records(texts("flaky one", "garbage", "fine")))
    kinds = [o.kind for o in out]
    if policy is ParseErrorPolicy.RETRY:
        assert kinds == ["verdict", "dead_letter", "verdict"]
    else:
        assert kinds == ["dead_letter", "dead_letter", "verdict"]
    dl = out[1].event
    assert isinstance(dl, DeadLetterEvent) and dl.error_code is ErrorCode.ENGINE_OUTPUT_UNPARSEABLE
    assert "I refuse to follow the format" in dl.message


def test_redis_outage_degrades_to_uncached_moderation(settings: Settings, cpu_engine: CpuEngine) -> None:
    from infra.stack import free_port

    dead = VerdictCache(f"redis://127.0.0.1:{free_port()}/0", 60)
    m = Moderator(settings, cpu_engine, None, dead)
    # texts far from the CPU engine's threshold whatever their random tag (a short neutral text like
    # "hello there [tag]" crosses it for a few tags in a hundred)
    out = m.process(
        records(texts("Lovely sunset at the lake", "Buy cocaine and MDMA here, fast discreet shipping"))
    )
    assert [o.kind for o in out] == ["verdict", "verdict"]
    assert [o.event.safe for o in out if isinstance(o.event, VerdictEvent)] == [True, False]


def test_cache_entries_have_ttl(settings: Settings, cpu_engine: CpuEngine, services: Services) -> None:
    m = build_moderator(settings.model_copy(update={"cache_ttl_s": 123}), cpu_engine)
    (o,) = m.process(records(texts("Lovely sunset at the lake")))
    assert isinstance(o.event, VerdictEvent)
    r = redis.Redis.from_url(services.redis_url)
    ttl = r.ttl(f"guardstream:verdict:v1:{o.event.content_hash}")
    assert 0 < ttl <= 123
    cached = json.loads(r.get(f"guardstream:verdict:v1:{o.event.content_hash}") or b"{}")
    assert cached["safe"] is o.event.safe is True
    assert cached["p_unsafe"] == o.event.scores.p_unsafe


def test_dead_letter_keeps_original_bytes_and_coordinates(settings: Settings, cpu_engine: CpuEngine) -> None:
    raw = b'{"post_id": "broken", "text": '
    (o,) = Moderator(settings, cpu_engine, None, None).process([Record("posts", 2, 41, b"k", raw)])
    dl = o.event
    assert isinstance(dl, DeadLetterEvent)
    assert (dl.error_code, dl.source_partition, dl.source_offset) == (ErrorCode.INVALID_JSON, 2, 41)
    assert dl.original_value() == raw and o.outputs[0].topic == settings.dlq_topic
    assert datetime.now(UTC) >= dl.failed_at
