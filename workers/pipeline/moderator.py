"""The transport-agnostic heart of the worker: consumed ``Record``s in, ``Outcome``s out (the exact messages
to publish for each record). Its data types are in ``workers.pipeline.records``.

- ``decode`` — each record's bytes to a validated ``PostEvent`` (``schemas.codec.decode_post``); a bad one
  is that record's dead letter with a stable ``ErrorCode``, never an exception;
- ``complete`` — fetch its images (``workers.media``), content hash, verdict-cache lookup;
- the engine on the cache misses: the streaming worker awaits ``StreamingEngine.judge`` per post
  (``workers.pipeline.engine_loop``); the batch path (``call_engine``: replay, offline tools) calls
  ``GuardEngine.moderate`` through ``workers.pipeline.batch``;
- ``finish`` — cache the new verdicts, build each ``Outcome`` (``workers.pipeline.outcomes``).

The Kafka worker (``workers.kafka.worker``) only moves bytes, awaits acks and commits; tests drive this
class with plain lists and the fakes in ``workers.testing``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime

import structlog

from guard.types import GuardEngine, ModerationItem, StreamingEngine
from schemas.codec import decode_post
from schemas.errors import RecordError
from schemas.events import ErrorCode, PostEvent
from schemas.wire import CachedVerdict
from workers.cache import ContentKeyer, VerdictStore
from workers.media import FetchedImage, ImageFetcher, MediaError, MediaUnavailable
from workers.observability.sensors import Sensor, default_sensor
from workers.pipeline.batch import judge_batch
from workers.pipeline.outcomes import OutcomeBuilder
from workers.pipeline.outcomes import to_cache as cache_entry
from workers.pipeline.records import Outcome, Prepared, Record
from workers.settings import ParseErrorPolicy, Settings

log = structlog.get_logger(__name__)


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
        self._outcomes = OutcomeBuilder.from_settings(
            settings,
            engine=engine.name,
            model_version=engine.model_version,
            policy_version=engine.policy_version,
            taxonomy=getattr(engine, "taxonomy", None),
        )
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
            self._judge(todo)
            if self.settings.on_parse_error is ParseErrorPolicy.RETRY:
                again = [p for p in todo if p.verdict is not None and p.verdict.parse_error]
                for p in again:  # once more, alone
                    self._judge([p])

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
                    to_cache.append((p.key, cache_entry(v)))
            if self.cache is not None:
                self.cache.put_many(to_cache)
        # one clock reading per batch: the batch is decided at one moment
        now, decided_at = time.monotonic(), datetime.now(UTC)
        outcomes = [self._outcomes.build(p, now, decided_at) for p in prepared]
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

    def _judge(self, items: list[Prepared]) -> None:
        engine = self.engine
        if not isinstance(engine, GuardEngine):
            raise TypeError(
                f"{engine.name}: the batch path needs a GuardEngine (moderate), got a streaming one"
            )
        judge_batch(engine, items, retries=self.settings.engine_retries, sensor=self.sensor)

    def process(self, records: Sequence[Record]) -> list[Outcome]:
        return self.infer(self.prepare(records))

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()
        if self.cache is not None:
            self.cache.close()
        if isinstance(self.engine, GuardEngine):  # a streaming engine is closed by its event loop (aclose)
            self.engine.close()


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
