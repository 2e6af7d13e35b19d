"""The transport-agnostic heart of the worker (its data types are in ``workers.pipeline.records``).

``prepare`` (decode → validate → fetch media → content hash → cache lookup) and ``infer`` (engine on
the cache misses as one batch → cache write → events) turn consumed records into ``Outcome``s: the
exact messages to publish for each record. The Kafka runner only moves bytes and commits; tests can
drive this class with plain lists.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import structlog

from guard.errors import EngineDeadError, EngineError
from guard.types import GuardEngine, ModerationItem, StreamingEngine, Verdict
from schemas.codec import decode_post
from schemas.errors import RecordError
from schemas.events import DeadLetterEvent, ErrorCode, ImageRef, PostEvent
from schemas.wire import CachedVerdict, ScoresWire, VerdictWire, encode
from workers.cache import ContentKeyer, VerdictStore
from workers.media import FetchedImage, ImageFetcher, MediaError, MediaUnavailable
from workers.observability.sensors import Sensor, default_sensor
from workers.pipeline.records import Outcome, OutcomeKind, Output, Record
from workers.settings import ParseErrorPolicy, Settings

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Prepared:
    record: Record
    started: float
    post: PostEvent | None = None
    item: ModerationItem | None = None
    key: str | None = None
    cached: CachedVerdict | None = None
    error: tuple[ErrorCode, str, str] | None = None  # code, error class, message
    verdict: Verdict | None = field(default=None)
    unavailable: str | None = None  # an infrastructure outage (S3) kept it from being prepared: retry later

    @property
    def image_refs(self) -> list[ImageRef]:
        """The refs this post still has to fetch (none once it failed or was fetched)."""
        if self.post is None or self.error is not None or self.item is not None or not self.post.images:
            return []
        return self.post.image_refs

    def drop_images(self) -> None:
        """Let go of the decoded images once the outcome is built (the record may wait for its acks)."""
        if self.item is not None and self.item.images:
            self.item = replace(self.item, images=())

    @property
    def needs_engine(self) -> bool:
        return (
            self.error is None and self.item is not None and self.cached is None and self.unavailable is None
        )


class Moderator:
    def __init__(
        self,
        settings: Settings,
        engine: GuardEngine | StreamingEngine,
        fetcher: ImageFetcher | None,
        cache: VerdictStore | None,
        *,
        sensor: Sensor | None = None,
    ) -> None:
        """``sensor``: where the batch's events go (default: the process-wide Prometheus sensor)."""
        self.settings = settings
        self.engine = engine
        self.fetcher = fetcher
        self.cache = cache
        self._keyer = ContentKeyer(
            engine=engine.name, model_version=engine.model_version, policy=engine.policy_version
        )
        self._taxonomy = getattr(engine, "taxonomy", None)
        self.sensor = sensor if sensor is not None else default_sensor()
        self.sensor.on_engine(engine.name)

    # ---------------------------------------------------------------- prepare
    def prepare(self, records: Sequence[Record]) -> list[Prepared]:
        """Decode, fetch media, hash and look up ``records``. Never raises for one record's sake: anything
        unexpected while preparing a record dead-letters that record (``internal_error``), so one hostile
        post cannot stop the stream. An S3 *outage* (``MediaUnavailable``) is not the post's fault: those
        records come back with ``unavailable`` set, for the caller to hold and retry.

        Two steps, which the streaming worker calls apart to admit image posts against its image budget
        between them: ``decode`` (the event: its image refs are known, nothing fetched) and ``complete``."""
        return self.complete(self.decode(records))

    def decode(self, records: Sequence[Record]) -> list[Prepared]:
        """Decode and validate each record's event (``post`` or ``error`` set); fetches nothing."""
        now = time.monotonic()
        prepared = [Prepared(record=r, started=now) for r in records]
        self.sensor.on_consumed(len(records))
        for p in prepared:
            try:
                p.post = decode_post(p.record.value)
            except RecordError as exc:
                _reject(p, exc)
            except Exception as exc:
                _internal(p, exc, "decode")
        return prepared

    def complete(self, prepared: list[Prepared]) -> list[Prepared]:
        """After ``decode``: fetch media, hash and look up the cache (in place; returns ``prepared``)."""
        with_images = [p for p in prepared if p.post is not None and p.post.images and p.error is None]
        if with_images:
            self._fetch(with_images)
        for p in prepared:
            if p.post is not None and p.error is None and p.item is None and p.unavailable is None:
                try:
                    p.item = ModerationItem(p.post.post_id, p.post.text)
                    p.key = self._key(p.post, [])
                except Exception as exc:
                    _internal(p, exc, "content hash")
        ready = [p for p in prepared if p.key is not None and p.error is None]
        if self.cache is not None and ready:
            try:
                hits = self.cache.get_many([p.key for p in ready if p.key])
            except Exception as exc:  # the cache degrades by itself; a bug in it must not stop the stream
                log.warning("cache_lookup_failed", error=repr(exc)[:300])
                hits = [None] * len(ready)
            for p, hit in zip(ready, hits, strict=True):
                p.cached = hit
        return prepared

    def _fetch(self, with_images: list[Prepared]) -> None:
        if self.fetcher is None:
            for p in with_images:
                p.error = (ErrorCode.S3_UNAVAILABLE, "ConfigError", "no media fetcher configured")
            return
        try:
            fetched = self.fetcher.fetch_posts([p.post.image_refs for p in with_images if p.post])
        except MediaUnavailable as exc:
            for p in with_images:
                p.unavailable = str(exc)[:500]
            return
        except Exception:
            # one post's images broke the batch fetch (a RecordError the fetcher raised instead of
            # returning it, or something unexpected): fetch post by post so only that post is
            # dead-lettered
            for p in with_images:
                self._fetch_one(p)
            return
        for p, res in zip(with_images, fetched, strict=True):
            self._attach(p, res)

    def _fetch_one(self, p: Prepared) -> None:
        assert self.fetcher is not None and p.post is not None
        try:
            (res,) = self.fetcher.fetch_posts([p.post.image_refs])
        except MediaUnavailable as exc:
            p.unavailable = str(exc)[:500]
            return
        except RecordError as exc:
            _reject(p, exc)
            return
        except Exception as exc:
            _internal(p, exc, "media fetch")
            return
        self._attach(p, res)

    def _attach(self, p: Prepared, res: list[FetchedImage] | MediaError) -> None:
        if isinstance(res, MediaError):
            _reject(p, res)
            return
        assert p.post is not None
        try:
            p.item = ModerationItem(p.post.post_id, p.post.text, tuple(f.image for f in res))
            p.key = self._key(p.post, [f.sha256 for f in res])
        except Exception as exc:
            p.item = None
            _internal(p, exc, "content hash")

    def _key(self, post: PostEvent, digests: list[str]) -> str:
        return self._keyer(post.modality.value, post.text, digests)

    @staticmethod
    def misses(prepared: Sequence[Prepared]) -> int:
        return sum(1 for p in prepared if p.needs_engine)

    # ---------------------------------------------------------------- infer
    def infer(self, prepared: Sequence[Prepared]) -> list[Outcome]:
        """The batch path (replay, offline tools): an S3 outage (``MediaUnavailable``) or a dead engine
        (``EngineDeadError``) fails the call instead of becoming dead letters (the streaming worker holds
        such records and retries them)."""
        down = next((p.unavailable for p in prepared if p.unavailable is not None), None)
        if down is not None:
            raise MediaUnavailable(down)
        self.call_engine(prepared)
        return self.finish(prepared)

    @staticmethod
    def _todo(prepared: Sequence[Prepared]) -> list[Prepared]:
        return [p for p in prepared if p.needs_engine]

    def call_engine(self, prepared: Sequence[Prepared]) -> None:
        """The batch path's engine step (``infer``; the bench times it alone): ``GuardEngine.moderate`` on
        the cache misses, with retries and bisection, nothing else. All the Python work around it (events,
        JSON, cache writes) is in ``finish``, so a caller can run the model call on a thread of its own,
        where a GPU engine waits with the GIL released, without the two contending. (The streaming
        worker does not come here: it awaits ``StreamingEngine.judge`` per post in
        ``workers.pipeline.engine_loop``.)"""
        todo = self._todo(prepared)
        if todo:
            self._run_engine(todo)
            if self.settings.on_parse_error is ParseErrorPolicy.RETRY:
                again = [p for p in todo if p.verdict is not None and p.verdict.parse_error]
                for p in again:  # once more, alone
                    self._run_engine([p])

    def finish(self, prepared: Sequence[Prepared]) -> list[Outcome]:
        """After ``call_engine``: cache the new verdicts, build the outcome (events to publish) per record."""
        todo = self._todo(prepared)
        hits = sum(1 for p in prepared if p.cached is not None and p.error is None)
        self.sensor.on_cache(hits, len(todo))
        if todo:
            to_cache: list[tuple[str, CachedVerdict]] = []
            for p in todo:
                v = p.verdict
                if v is None:
                    continue
                if v.parse_error:
                    p.error = (
                        ErrorCode.ENGINE_OUTPUT_UNPARSEABLE,
                        "ParseError",
                        f"{v.extra.get('parse_error_reason', 'unparseable')}; "
                        f"raw={(v.raw_output or '')[:1500]!r}",
                    )
                elif p.key is not None and self.cache is not None:
                    to_cache.append((p.key, _to_cache(v)))
            if self.cache is not None:
                self.cache.put_many(to_cache)
        # one clock reading per batch: the batch is decided at one moment
        now, decided_at = time.monotonic(), datetime.now(UTC)
        outcomes = [self._outcome(p, now, decided_at) for p in prepared]
        self._count(outcomes, decided_at)
        return outcomes

    def _count(self, outcomes: list[Outcome], decided_at: datetime) -> None:
        """One sensor event per batch (the sensor makes one locked increment per label, not one per post)."""
        by_label: dict[bool | None, int] = {}
        by_code: dict[ErrorCode, int] = {}
        novel = 0
        ages: list[float] = []
        for o in outcomes:
            ev = o.verdict
            if ev is not None:
                by_label[ev.safe] = by_label.get(ev.safe, 0) + 1
                novel += len(o.outputs) > 1
                created = ev.post_created_at
                if created.tzinfo is None:
                    created = created.replace(tzinfo=UTC)
                ages.append(max(0.0, (decided_at - created).total_seconds()))
            elif o.dead_letter is not None:
                code = o.dead_letter.error_code
                by_code[code] = by_code.get(code, 0) + 1
        self.sensor.on_outcomes(self.engine.name, by_label, by_code, novel, ages)

    def _run_engine(self, items: list[Prepared]) -> None:
        """Moderate ``items`` in one call; on failure retry, then bisect to isolate poison posts. (The batch
        path, for replay and offline tools; the Kafka worker streams through
        ``workers.pipeline.engine_loop``.)"""
        engine = self.engine
        if not isinstance(engine, GuardEngine):
            raise TypeError(
                f"{engine.name}: the batch path needs a GuardEngine (moderate), got a streaming one"
            )
        batch = [p.item for p in items if p.item is not None]
        last: Exception | None = None
        for attempt in range(self.settings.engine_retries + 1):
            t0 = time.perf_counter()
            try:
                verdicts = engine.moderate(batch)
                if len(verdicts) != len(batch):
                    raise EngineError(f"engine returned {len(verdicts)} verdicts for {len(batch)} items")
            except EngineDeadError:
                # the engine is gone, no post is to blame: never retried item by item nor dead-lettered
                # (the caller's outage, like MediaUnavailable in ``infer``)
                self.sensor.on_engine_failure()
                raise
            except Exception as exc:
                self.sensor.on_engine_failure()
                last = exc
                log.warning("engine_batch_failed", size=len(batch), attempt=attempt, error=repr(exc)[:300])
                continue
            self.sensor.on_engine_batch(len(batch), time.perf_counter() - t0)
            for p, v in zip(items, verdicts, strict=True):
                p.verdict = v
            return
        if len(items) == 1:
            items[0].error = (ErrorCode.ENGINE_FAILED, type(last).__name__, repr(last)[:1000])
            return
        mid = len(items) // 2
        self._run_engine(items[:mid])
        self._run_engine(items[mid:])

    # ---------------------------------------------------------------- events
    def _outcome(self, p: Prepared, now: float, decided_at: datetime) -> Outcome:
        r = p.record
        s = self.settings
        if p.error is not None or p.post is None:
            return self._dead_letter(p)
        post = p.post
        v: Verdict | CachedVerdict | None = p.cached if p.cached is not None else p.verdict
        assert v is not None and p.key is not None
        tax = self._taxonomy
        ev = VerdictWire(
            post_id=post.post_id,
            author_id=post.author_id,
            modality=post.modality,
            safe=v.safe,
            category=v.category,
            category_name=tax.category_name(v.category) if tax else None,
            subcategory=v.subcategory,
            subcategory_name=tax.subcategory_name(v.subcategory) if tax else None,
            novel_risk=v.novel_risk,
            abstained_reason=v.abstained_reason,
            parse_error=False,  # an unparseable output is dead-lettered (finish), never published
            reasoning=v.reasoning if s.publish_reasoning else None,
            raw_output=v.raw_output if s.publish_reasoning else None,
            scores=ScoresWire(p_unsafe=v.p_unsafe, category_similarity=v.category_similarity),
            engine=self.engine.name,
            model_version=self.engine.model_version,
            policy_version=self.engine.policy_version,
            content_hash=p.key,
            cache_hit=p.cached is not None,
            latency_ms=round((now - p.started) * 1000.0, 3),
            source_topic=r.topic,
            source_partition=r.partition,
            source_offset=r.offset,
            post_created_at=post.created_at,
            decided_at=decided_at,
        )
        key = post.post_id.encode()
        outputs = [Output(s.kafka.verdicts_topic, key, encode(ev))]
        if ev.novel_risk or (ev.safe is False and ev.category is None):
            outputs.append(Output(s.kafka.novel_risk_topic, key, outputs[0].value))
        return Outcome(r, OutcomeKind.VERDICT, post.post_id, outputs, verdict=ev)

    def _dead_letter(self, p: Prepared) -> Outcome:
        r = p.record
        code, cls, msg = p.error or (ErrorCode.INVALID_EVENT, "Unknown", "no post")
        raw = r.value or b""
        dl = DeadLetterEvent(
            post_id=p.post.post_id if p.post else _post_id_hint(r.value),
            error_code=code,
            error_class=cls,
            message=msg,
            source_topic=r.topic,
            source_partition=r.partition,
            source_offset=r.offset,
            original_key_b64=DeadLetterEvent.encode_bytes(
                r.key[: self.settings.dlq_max_original_bytes] if r.key else r.key
            ),
            original_value_b64=DeadLetterEvent.encode_bytes(raw[: self.settings.dlq_max_original_bytes])
            or "",
            original_value_size=len(raw),
            original_value_sha256=hashlib.sha256(raw).hexdigest(),
            original_value_truncated=len(raw) > self.settings.dlq_max_original_bytes,
        )
        log.info(
            "post_dead_lettered",
            post_id=dl.post_id,
            topic=r.topic,
            partition=r.partition,
            offset=r.offset,
            error_code=code.value,
            reason=msg[:200],
        )
        value = dl.__pydantic_serializer__.to_json(dl)
        return Outcome(
            r,
            OutcomeKind.DEAD_LETTER,
            dl.post_id,
            [Output(self.settings.kafka.dlq_topic, r.key, value)],
            dead_letter=dl,
        )

    def process(self, records: Sequence[Record]) -> list[Outcome]:
        return self.infer(self.prepare(records))

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()
        if self.cache is not None:
            self.cache.close()
        if isinstance(self.engine, GuardEngine):  # a streaming engine is closed by its event loop (aclose)
            self.engine.close()


def _to_cache(v: Verdict) -> CachedVerdict:
    return CachedVerdict(
        safe=v.safe,
        category=v.category,
        subcategory=v.subcategory,
        novel_risk=v.novel_risk,
        p_unsafe=v.p_unsafe,
        category_similarity=v.category_similarity,
        reasoning=v.reasoning,
        raw_output=v.raw_output,
        abstained_reason=v.abstained_reason,
    )


def _post_id_hint(raw: bytes | None) -> str | None:
    """Best effort post_id from an invalid event, for the dead letter (never raises)."""
    import json

    try:
        obj = json.loads(raw or b"")
    except Exception:
        return None
    pid = obj.get("post_id") if isinstance(obj, dict) else None
    # a lone surrogate ("\ud800") would make the dead letter itself unserialisable: replace it
    return pid[:256].encode("utf-8", "replace").decode("utf-8") if isinstance(pid, str) else None


def _reject(p: Prepared, exc: RecordError) -> None:
    """A fact about this record (``DecodeError``, ``MediaError``, any ``RecordError``): its dead letter,
    with the error's own code."""
    p.error = (exc.code, type(exc).__name__, exc.message)


def _internal(p: Prepared, exc: Exception, stage: str) -> None:
    """The last line of defence: an exception nobody planned for becomes this record's dead letter."""
    p.error = (ErrorCode.INTERNAL_ERROR, type(exc).__name__, f"{stage}: {exc!r}"[:1000])
    log.error(
        "prepare_internal_error",
        stage=stage,
        error_class=type(exc).__name__,
        topic=p.record.topic,
        partition=p.record.partition,
        offset=p.record.offset,
        exc_info=exc,
    )


def shrink_output(out: Output, outcome: Outcome) -> Output | None:
    """A smaller version of an output the broker refused as too large (``MSG_SIZE_TOO_LARGE``): a dead
    letter loses the original bytes (size and sha256 stay) and most of its message; a verdict loses its
    reasoning and raw output. None when there is nothing left to cut."""
    dl = outcome.dead_letter
    if dl is not None:
        if not dl.original_value_b64 and len(dl.message) <= 200 and not dl.original_key_b64:
            return None
        small = dl.model_copy(
            update={
                "original_value_b64": "",
                "original_key_b64": None,
                "original_value_truncated": True,
                "message": dl.message[:200],
            }
        )
        outcome.dead_letter = small
        return Output(out.topic, out.key, small.__pydantic_serializer__.to_json(small))
    v = outcome.verdict
    if v is not None and (v.reasoning or v.raw_output):
        v.reasoning = None
        v.raw_output = None
        return Output(out.topic, out.key, encode(v))
    return None
