"""The transport-free ``Moderator`` with the fakes of ``workers.testing``: no broker, S3 or Redis.

Decode errors become dead letters with stable codes and the original bytes; cache hits skip the engine;
identical content has one content key; multi-image posts; a post's media error is its dead letter while
a media outage holds the batch (never a dead letter); ``internal_error`` is the last line of defence;
on the batch path a failing request isolates its post (``engine_failed``) while a dead engine fails the
call.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from PIL import Image

from guard.errors import EngineDeadError, EngineError, EngineRequestError
from guard.parser import format_output
from guard.prompts import PromptSet
from guard.types import ModerationItem, Verdict
from infra.stack import free_port
from schemas.events import DeadLetterEvent, ErrorCode, VerdictEvent
from schemas.wire import CachedVerdict
from tests.engines import RawOutputEngine
from workers.cache import VerdictCache
from workers.media import MediaError, MediaUnavailable
from workers.pipeline.moderator import Moderator
from workers.pipeline.records import Outcome, OutcomeKind, Record
from workers.settings import ParseErrorPolicy, Settings
from workers.testing import (
    FakeBatchEngine,
    FakeMediaFetcher,
    InMemoryVerdictCache,
    make_post,
    record_of,
    records_of,
)

BUCKET = "media"


def ref(name: str) -> str:
    return f"s3://{BUCKET}/{name}.png"


def image(colour: tuple[int, int, int], side: int = 8) -> Image.Image:
    return Image.new("RGB", (side, side), colour)


def codes(outcomes: Sequence[Outcome]) -> list[ErrorCode | None]:
    return [o.dead_letter.error_code if o.dead_letter is not None else None for o in outcomes]


def verdict_of(o: Outcome) -> VerdictEvent:
    ev = o.event
    assert isinstance(ev, VerdictEvent), ev
    return ev


# ------------------------------------------------------------------ decode errors


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"post_id": "broken", "text": ', ErrorCode.INVALID_JSON),
        (b"\xff\xfe not utf-8", ErrorCode.INVALID_JSON),
        (b'{"post_id": "p", "text": "\\ud800"}', ErrorCode.INVALID_JSON),  # a lone surrogate
        (b"[1, 2]", ErrorCode.INVALID_EVENT),
        (b'{"post_id": "p", "text": "no author, no date"}', ErrorCode.INVALID_EVENT),
        (
            json.dumps(
                {"schema_version": 7, "post_id": "p", "author_id": "a", "created_at": "2024-01-01T00:00:00Z"}
            ).encode(),
            ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
        ),
        (make_post("p", "   ").model_dump_json().encode(), ErrorCode.EMPTY_POST),
        (make_post("p", "x" * 20_001).model_dump_json().encode(), ErrorCode.TEXT_TOO_LONG),
    ],
)
def test_a_record_that_does_not_decode_is_a_dead_letter_with_its_code(
    settings: Settings, raw: bytes, code: ErrorCode
) -> None:
    engine = FakeBatchEngine()
    (o,) = Moderator(settings, engine, None, None).process([Record("posts", 2, 41, b"k", raw)])
    dl = o.dead_letter
    assert o.kind is OutcomeKind.DEAD_LETTER and dl is not None
    assert dl.error_code is code, dl.message
    assert (dl.source_topic, dl.source_partition, dl.source_offset) == ("posts", 2, 41)
    assert dl.original_value() == raw and dl.original_value_size == len(raw)
    assert [(out.topic, out.key) for out in o.outputs] == [(settings.dlq_topic, b"k")]
    assert engine.calls == []  # nothing reached the engine


def test_dead_letter_keeps_original_bytes_and_coordinates(settings: Settings) -> None:
    raw = b'{"post_id": "broken", "text": '
    (o,) = Moderator(settings, FakeBatchEngine(), None, None).process([Record("posts", 2, 41, b"k", raw)])
    dl = o.event
    assert isinstance(dl, DeadLetterEvent)
    assert (dl.error_code, dl.source_partition, dl.source_offset) == (ErrorCode.INVALID_JSON, 2, 41)
    assert dl.original_value() == raw and o.outputs[0].topic == settings.dlq_topic
    assert datetime.now(UTC) >= dl.failed_at


def test_an_invalid_event_dead_letter_names_its_post_id_when_it_can(settings: Settings) -> None:
    raw = b'{"post_id": "p-17", "text": "no author, no date"}'
    (o,) = Moderator(settings, FakeBatchEngine(), None, None).process([Record("posts", 0, 3, None, raw)])
    assert o.dead_letter is not None and o.dead_letter.error_code is ErrorCode.INVALID_EVENT
    assert o.post_id == o.dead_letter.post_id == "p-17"


def test_a_dead_letter_keeps_a_bounded_prefix_with_size_and_hash(settings: Settings) -> None:
    s = settings.model_copy(update={"dlq_max_original_bytes": 1000})
    raw = b'{"post_id": "huge", "text": "' + b"x" * 900_000 + b'"'  # broken JSON, 900 KB
    (o,) = Moderator(s, FakeBatchEngine(), None, None).process([Record("posts", 0, 7, b"k", raw)])
    dl = o.dead_letter
    assert dl is not None and dl.error_code in (ErrorCode.INVALID_EVENT, ErrorCode.INVALID_JSON)
    assert dl.original_value() == raw[:1000] and dl.original_value_truncated
    assert dl.original_value_size == len(raw) and dl.original_value_sha256 == hashlib.sha256(raw).hexdigest()
    assert len(o.outputs[0].value) < 10_000  # fits any broker
    (small,) = Moderator(s, FakeBatchEngine(), None, None).process([Record("posts", 0, 8, None, b"{")])
    assert small.dead_letter is not None and small.dead_letter.original_value() == b"{"
    assert not small.dead_letter.original_value_truncated


def test_good_records_around_bad_ones_get_verdicts_in_order(settings: Settings) -> None:
    engine = FakeBatchEngine()
    recs = records_of([make_post("a", "first"), b"not json", None, make_post("b", "second")])
    out = Moderator(settings, engine, None, None).process(recs)
    assert [o.kind for o in out] == ["verdict", "dead_letter", "dead_letter", "verdict"]
    assert [o.record.offset for o in out] == [0, 1, 2, 3]
    assert engine.calls == [["a", "b"]]  # one batch of the two valid posts
    assert [verdict_of(out[0]).source_offset, verdict_of(out[3]).source_offset] == [0, 3]


# ------------------------------------------------------------------ cache


def test_cache_hits_skip_the_engine_and_decide_identically(settings: Settings) -> None:
    engine, cache = FakeBatchEngine(), InMemoryVerdictCache(ttl_s=60)
    m = Moderator(settings, engine, None, cache)
    posts = [make_post(f"p{i}", f"post number {i}") for i in range(6)]
    first = m.process(records_of(posts))
    assert len(engine.calls) == 1 and not any(verdict_of(o).cache_hit for o in first)
    assert len(cache) == 6
    again = m.process(records_of(posts, start=6))
    assert len(engine.calls) == 1, "a cache hit reached the engine"
    for a, b in zip(first, again, strict=True):
        va, vb = verdict_of(a), verdict_of(b)
        assert vb.cache_hit and vb.content_hash == va.content_hash
        assert (vb.safe, vb.scores.p_unsafe) == (va.safe, va.scores.p_unsafe)
    # the engine's decisions differ across these posts, so the hits did not all come from one entry
    assert {verdict_of(o).safe for o in first} == {True, False}


def test_a_cache_that_is_down_moderates_every_post_and_caches_nothing(settings: Settings) -> None:
    engine, cache = FakeBatchEngine(), InMemoryVerdictCache()
    m = Moderator(settings, engine, None, cache)
    posts = [make_post("a", "one"), make_post("b", "two")]
    m.process(records_of(posts))
    cache.down = True
    out = m.process(records_of(posts))
    assert [o.kind for o in out] == ["verdict", "verdict"]
    assert not any(verdict_of(o).cache_hit for o in out)
    assert engine.calls == [["a", "b"], ["a", "b"]]


def test_cache_entries_expire_after_the_ttl(settings: Settings) -> None:
    now = [1000.0]
    engine, cache = FakeBatchEngine(), InMemoryVerdictCache(ttl_s=123, clock=lambda: now[0])
    m = Moderator(settings, engine, None, cache)
    (o,) = m.process([record_of(make_post("a", "Lovely sunset at the lake"))])
    assert cache.ttl(verdict_of(o).content_hash) == 123
    now[0] += 122.0
    assert verdict_of(m.process([record_of(make_post("a", "Lovely sunset at the lake"))])[0]).cache_hit
    now[0] += 1.0
    assert not verdict_of(m.process([record_of(make_post("a", "Lovely sunset at the lake"))])[0]).cache_hit
    assert len(engine.calls) == 2


def test_redis_outage_degrades_to_uncached_moderation(settings: Settings) -> None:
    # the real VerdictCache, on a port nothing listens on: misses, no writes, no exception
    dead = VerdictCache(f"redis://127.0.0.1:{free_port()}/0", 60)
    engine = FakeBatchEngine()
    out = Moderator(settings, engine, None, dead).process(
        records_of([make_post("a", "x"), make_post("b", "y")])
    )
    assert [o.kind for o in out] == ["verdict", "verdict"]
    assert engine.calls == [["a", "b"]]
    dead.close()


class BrokenCache(InMemoryVerdictCache):
    """A cache with a bug: ``get_many`` raises something no outage handling expects."""

    def get_many(self, keys: Sequence[str]) -> list[CachedVerdict | None]:
        raise KeyError("a bug in the cache")


def test_a_bug_in_the_cache_is_a_miss_not_a_stopped_stream(settings: Settings) -> None:
    engine = FakeBatchEngine()
    out = Moderator(settings, engine, None, BrokenCache()).process([record_of(make_post("a", "x"))])
    assert [o.kind for o in out] == ["verdict"] and engine.calls == [["a"]]


# ------------------------------------------------------------------ content keys


def test_identical_content_has_one_key_and_one_cache_entry(settings: Settings) -> None:
    fetcher = FakeMediaFetcher({ref("r"): image((200, 0, 0)), ref("r2"): image((200, 0, 0))})
    cache = InMemoryVerdictCache()
    m = Moderator(settings, FakeBatchEngine(), fetcher, cache)
    posts = [
        make_post("a", "same words", author="x"),
        make_post("b", "same words", author="y"),  # another author, another id: same content
        make_post("c", "same words", [ref("r")]),
        make_post("d", "same words", [ref("r2")]),  # another object with the identical pixels
        make_post("e", "other words"),
    ]
    prepared = m.prepare(records_of(posts))
    keys = [p.key for p in prepared]
    assert keys[0] == keys[1] and keys[2] == keys[3]
    assert len(set(keys)) == 3
    m.infer(prepared)
    assert len(cache) == 3  # one entry per distinct content
    assert [len(c) for c in cache.gets] == [5]  # one MGET for the batch


def test_the_key_depends_on_images_modality_and_engine_policy(settings: Settings) -> None:
    fetcher = FakeMediaFetcher({ref("red"): image((200, 0, 0)), ref("blue"): image((0, 0, 200))})
    m = Moderator(settings, FakeBatchEngine(), fetcher, None)
    posts = [
        make_post("a", "caption", [ref("red")]),
        make_post("b", "caption", [ref("blue")]),
        make_post("c", "caption", [ref("red"), ref("blue")]),
        make_post("d", "caption", [ref("blue"), ref("red")]),
        make_post("e", "caption"),
    ]
    keys = [p.key for p in m.prepare(records_of(posts))]
    assert len(set(keys)) == 5, keys
    other = FakeBatchEngine()
    other.policy_version = "other-policy"
    assert Moderator(settings, other, fetcher, None).prepare(records_of(posts[:1]))[0].key != keys[0]


# ------------------------------------------------------------------ images


def test_a_multi_image_post_reaches_the_engine_with_its_images_in_order(settings: Settings) -> None:
    imgs = {ref(f"i{k}"): image((k * 60, 10, 10), side=4 + k) for k in range(3)}
    fetcher = FakeMediaFetcher(imgs)
    seen: dict[str, list[tuple[int, int]]] = {}

    def verdict(it: ModerationItem) -> Verdict:
        seen[it.post_id] = [im.size for im in it.images]
        return Verdict(safe=True, p_unsafe=0.0)

    m = Moderator(settings, FakeBatchEngine(verdict=verdict), fetcher, None)
    refs = [ref("i2"), ref("i0"), ref("i1")]
    posts = [make_post("multi", "three pictures", refs), make_post("again", None, [ref("i0")])]
    out = m.process(records_of(posts))
    assert [o.kind for o in out] == ["verdict", "verdict"]
    assert seen == {"multi": [(6, 6), (4, 4), (5, 5)], "again": [(4, 4)]}
    assert verdict_of(out[0]).modality.value == "text_image" and verdict_of(out[1]).modality.value == "image"
    assert fetcher.fetched[ref("i0")] == 1  # a ref shared by two posts of the batch: fetched once
    assert len(fetcher.calls) == 1  # the batch's images in one call


def test_a_media_error_dead_letters_only_its_post(settings: Settings) -> None:
    fetcher = FakeMediaFetcher(
        {
            ref("ok"): image((1, 2, 3)),
            ref("bomb"): MediaError(ErrorCode.IMAGE_DECOMPRESSION_BOMB, "89 MP"),
        }
    )
    engine = FakeBatchEngine()
    posts = [
        make_post("fine", "x", [ref("ok")]),
        make_post("bomb", "y", [ref("ok"), ref("bomb")]),  # one bad image of two: the post fails
        make_post("gone", "z", [ref("missing")]),
        make_post("text", "no images"),
    ]
    out = Moderator(settings, engine, fetcher, None).process(records_of(posts))
    assert codes(out) == [None, ErrorCode.IMAGE_DECOMPRESSION_BOMB, ErrorCode.IMAGE_NOT_FOUND, None]
    assert engine.calls == [["fine", "text"]]
    bomb = out[1].dead_letter
    assert bomb is not None and bomb.error_class == "MediaError" and "89 MP" in bomb.message


def test_a_media_outage_holds_the_batch_and_is_never_a_dead_letter(settings: Settings) -> None:
    fetcher = FakeMediaFetcher({ref("a"): MediaUnavailable("S3 503 SlowDown after 4 attempts")})
    engine = FakeBatchEngine()
    m = Moderator(settings, engine, fetcher, InMemoryVerdictCache())
    posts = [make_post("img", "x", [ref("a")]), make_post("txt", "plain text")]
    # the streaming worker's path: the image post comes back unavailable (to hold and retry), the text
    # post is ready
    img, txt = m.prepare(records_of(posts))
    assert img.unavailable is not None and "SlowDown" in img.unavailable
    assert img.error is None and not img.needs_engine
    assert txt.needs_engine
    # the batch path (replay): the outage fails the call, nothing is dead-lettered
    with pytest.raises(MediaUnavailable, match="SlowDown"):
        m.process(records_of(posts))
    assert engine.calls == []
    # S3 is back: the same records go through
    fetcher.results[ref("a")] = image((9, 9, 9))
    assert [o.kind for o in m.process(records_of(posts))] == ["verdict", "verdict"]


def test_image_posts_without_a_fetcher_are_dead_letters(settings: Settings) -> None:
    (o,) = Moderator(settings, FakeBatchEngine(), None, None).process(
        [record_of(make_post("i", None, [ref("a")]))]
    )
    assert codes([o]) == [ErrorCode.S3_UNAVAILABLE]


# ------------------------------------------------------------------ the last line of defence


def test_an_unexpected_exception_dead_letters_only_that_record(settings: Settings) -> None:
    fetcher = FakeMediaFetcher({ref("boom"): struct.error("unpack requires a buffer of 4 bytes")})
    m = Moderator(settings, FakeBatchEngine(), fetcher, None)
    vals: list[bytes | None] = [
        make_post("ok", "fine", [ref("absent")]).model_dump_json().encode(),
        make_post("bad", "x", [ref("boom")]).model_dump_json().encode(),
        make_post("fine", "y", [ref("absent2")]).model_dump_json().encode(),
        b"not json",
    ]
    outs = m.process([Record("posts", 0, i, None, v) for i, v in enumerate(vals)])
    assert codes(outs) == [
        ErrorCode.IMAGE_NOT_FOUND,
        ErrorCode.INTERNAL_ERROR,
        ErrorCode.IMAGE_NOT_FOUND,
        ErrorCode.INVALID_JSON,
    ]
    bad = outs[1].dead_letter
    assert bad is not None and bad.post_id == "bad" and bad.error_class == "error"  # struct.error
    assert "media fetch" in bad.message
    # the batch fetch failed, so the posts were fetched one by one: the bug hit only its own post
    assert len(fetcher.calls) == 4


# ------------------------------------------------------------------ the engine (batch path)


def test_a_failing_request_isolates_its_post_by_bisection(settings: Settings) -> None:
    def fail(it: ModerationItem) -> BaseException | None:
        return EngineRequestError("400: prompt too long") if "POISON" in (it.text or "") else None

    engine = FakeBatchEngine(fail=fail)
    m = Moderator(settings.model_copy(update={"engine_retries": 1}), engine, None, None)
    posts = [make_post(f"p{i}", f"ordinary post number {i}") for i in range(7)]
    posts.append(make_post("p7", "this one is POISON"))
    out = m.process(records_of(posts))
    assert codes(out) == [None] * 7 + [ErrorCode.ENGINE_FAILED]
    dl = out[-1].dead_letter
    assert dl is not None and dl.error_class == "EngineRequestError" and "prompt too long" in dl.message
    assert dl.original_value() == record_of(posts[-1]).value
    assert len(engine.calls[0]) == 8 and ["p7"] in engine.calls  # the whole batch first, then the post alone


def test_an_engine_failing_every_call_dead_letters_every_post(settings: Settings) -> None:
    engine = FakeBatchEngine(fail=lambda _it: EngineError("every call fails"))
    m = Moderator(settings.model_copy(update={"engine_retries": 0}), engine, None, None)
    out = m.process(records_of([make_post(p, p) for p in "abc"]))
    assert codes(out) == [ErrorCode.ENGINE_FAILED] * 3


def test_a_dead_engine_fails_the_call_and_dead_letters_nothing(settings: Settings) -> None:
    engine = FakeBatchEngine(fail=lambda _it: EngineDeadError("CUDA error: an illegal memory access"))
    m = Moderator(settings.model_copy(update={"engine_retries": 2}), engine, None, None)
    with pytest.raises(EngineDeadError, match="illegal memory access"):
        m.process(records_of([make_post(p, p) for p in "abcd"]))
    assert engine.calls == [["a", "b", "c", "d"]]  # not retried, not bisected: no post is to blame


@pytest.mark.parametrize("policy", [ParseErrorPolicy.DLQ, ParseErrorPolicy.RETRY])
def test_parse_errors_are_routed_by_policy(
    settings: Settings, prompts: PromptSet, policy: ParseErrorPolicy
) -> None:
    def respond(item: ModerationItem, call: int) -> str:
        if "flaky" in (item.text or "") and call == 1:
            return "<think>\ncut off mid-sent"
        if "garbage" in (item.text or ""):
            return "I refuse to follow the format"
        return format_output(unsafe=True, category="C9S1")

    engine = RawOutputEngine(prompts, respond)
    m = Moderator(settings.model_copy(update={"on_parse_error": policy}), engine, None, None)
    out = m.process(
        records_of([make_post("1", "flaky one"), make_post("2", "garbage"), make_post("3", "fine")])
    )
    kinds = [o.kind for o in out]
    if policy is ParseErrorPolicy.RETRY:
        assert kinds == ["verdict", "dead_letter", "verdict"]
    else:
        assert kinds == ["dead_letter", "dead_letter", "verdict"]
    dl = out[1].event
    assert isinstance(dl, DeadLetterEvent) and dl.error_code is ErrorCode.ENGINE_OUTPUT_UNPARSEABLE
    assert "I refuse to follow the format" in dl.message


# ------------------------------------------------------------------ outputs


def test_unsafe_without_a_category_is_also_published_as_a_novel_risk(settings: Settings) -> None:
    def verdict(it: ModerationItem) -> Verdict:
        if it.post_id == "novel":
            return Verdict(safe=False, novel_risk="blackout challenge", p_unsafe=0.9)
        return Verdict(safe=it.post_id != "unsafe", category="C8" if it.post_id == "unsafe" else None)

    out = Moderator(settings, FakeBatchEngine(verdict=verdict), None, None).process(
        records_of([make_post(p, f"text of {p}") for p in ("safe", "unsafe", "novel")])
    )
    topics = [[o.topic for o in oc.outputs] for oc in out]
    assert topics == [
        [settings.verdicts_topic],
        [settings.verdicts_topic],
        [settings.verdicts_topic, settings.novel_risk_topic],
    ]
    assert all(oc.outputs[0].key == oc.post_id.encode() for oc in out if oc.post_id)
