"""Fakes shipped with the package, so the transport-free pipeline runs without Kafka, S3 or Redis.

What the ``Moderator`` (``workers.pipeline.moderator``) needs from the outside is four seams: an engine
(``StreamingEngine.judge`` per post, or the batch ``GuardEngine.moderate``), an image fetcher
(``workers.media.ImageFetcher``), a verdict cache (``workers.cache.VerdictStore``) and ``Record``s in.
This module has a deterministic fake for each, and helpers that build ``Record``s from ``PostEvent``s:

- ``FakeStreamingEngine`` — per-post requests that complete when *the test* says so (``gate``/``open``,
  thread-safe, no sleeps), fail as told (``fail``), hold, hang, or die (``dead``);
- ``FakeBatchEngine`` — the batch seam; a batch containing a post ``fail`` names raises (a poison post);
- ``InMemoryVerdictCache`` — MGET/SET semantics with a TTL, entries stored in the wire format Redis holds,
  and ``down`` for an outage (misses, writes dropped — what ``VerdictCache`` does with Redis gone);
- ``FakeMediaFetcher`` — per-ref results: an image, a ``MediaError`` (that post's dead letter), a
  ``MediaUnavailable`` (the whole batch's outage) or any other exception (a bug);
- ``make_post`` / ``record_of`` / ``records_of`` — ``Record``s as the Kafka worker would build them;
- ``OutcomeRecorder`` — an ``OutcomeObserver`` of the Kafka worker that keeps what each commit covered.

Verdicts are a pure function of the content (``decision``), so a re-run decides identically.
Each fake is one self-contained class: nothing here is shared state between them.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime

from PIL import Image

from guard.errors import EngineDeadError
from guard.types import ModerationItem, Verdict
from schemas.events import ErrorCode, ImageRef, PostEvent
from schemas.wire import CachedVerdict, decode_cached, encode
from workers.media import FetchedImage, MediaError, MediaUnavailable, bytes_per_pixel
from workers.pipeline.records import Outcome, Record

__all__ = [
    "FakeBatchEngine",
    "FakeMediaFetcher",
    "FakeStreamingEngine",
    "InMemoryVerdictCache",
    "OutcomeRecorder",
    "decision",
    "fake_verdict",
    "make_post",
    "record_of",
    "records_of",
]

# ------------------------------------------------------------------ verdicts


def decision(text: str | None) -> bool:
    """A deterministic ``safe`` from the text (a re-run must give the identical decision): about one
    text in three is unsafe."""
    return hashlib.sha256((text or "").encode("utf-8", "surrogatepass")).digest()[0] % 3 != 0


def fake_verdict(item: ModerationItem) -> Verdict:
    """The fakes' verdict: ``decision`` over the text (an unsafe one carries no category, so it is also
    routed to the novel-risk topic)."""
    safe = decision(item.text)
    return Verdict(safe=safe, p_unsafe=0.1 if safe else 0.9)


# ------------------------------------------------------------------ streaming engine


class _Gate:
    __slots__ = ("opened", "waiters")

    def __init__(self) -> None:
        self.opened = False
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []


class FakeStreamingEngine:
    """The per-request seam (``StreamingEngine``) with completions under the test's control.

    - ``gate(*post_ids)`` before the requests arrive, ``open(*post_ids)`` later (from any thread): a gated
      request waits on an ``asyncio.Event`` until opened — opening them in any order gives out-of-order
      completion, deterministically.
    - ``fail(item, attempt)`` returns the exception a request raises (``attempt`` counts that post's
      requests from 1), or None: an ``EngineRequestError`` is that post's, an ``EngineDeadError`` the
      engine's.
    - ``dead`` (a ``threading.Event``): every request raises ``EngineDeadError`` while it is set.
    - ``hold(post_id)``: the request waits for ``release`` (a ``threading.Event``); ``hang(post_id)``:
      it is never answered (only a timeout or a cancel ends it).
    - ``latency(post_id)``: simulated service time in seconds (default 0) — a property of the engine
      under test, never a stand-in for synchronisation: use gates for that.

    Observed: ``started`` (requests), ``attempts`` (per post), ``answered`` (post ids, completion order),
    ``cancelled`` / ``cancel_seen``, ``entered`` (set when the ``enter_at``-th request starts) and
    ``wait_started(n, timeout)``.
    """

    name = "fake-streaming"
    model_version = "test"
    policy_version = "test"

    def __init__(
        self,
        *,
        latency: Callable[[str], float] = lambda _pid: 0.0,
        max_in_flight: int = 64,
        hold: Callable[[str], bool] = lambda _pid: False,
        hang: Callable[[str], bool] = lambda _pid: False,
        fail: Callable[[ModerationItem, int], BaseException | None] = lambda _it, _n: None,
        verdict: Callable[[ModerationItem], Verdict] = fake_verdict,
    ) -> None:
        self.latency, self.hold, self.hang, self.fail, self.verdict = latency, hold, hang, fail, verdict
        self.max_in_flight = max_in_flight
        self.release = threading.Event()
        self.dead = threading.Event()
        self.started = 0
        self.attempts: Counter[str] = Counter()
        self.cancelled = 0
        self.cancel_seen = threading.Event()  # set on the engine loop when a request is cancelled
        self.answered: list[str] = []
        self.entered = threading.Event()
        self.enter_at = 1
        self.closed = False
        self._cv = threading.Condition()
        self._gates: dict[str, _Gate] = {}

    # ------------------------------------------------------------ gates
    def gate(self, *post_ids: str) -> None:
        """Requests for these posts wait until ``open``."""
        with self._cv:
            for pid in post_ids:
                self._gates.setdefault(pid, _Gate())

    def open(self, *post_ids: str) -> None:
        """Let the gated requests of these posts complete (thread-safe; also before they arrive)."""
        with self._cv:
            for pid in post_ids:
                g = self._gates.setdefault(pid, _Gate())
                g.opened = True
                for loop, ev in g.waiters:
                    loop.call_soon_threadsafe(ev.set)
                g.waiters.clear()

    async def _pass_gate(self, post_id: str) -> None:
        with self._cv:
            g = self._gates.get(post_id)
            if g is None or g.opened:
                return
            ev = asyncio.Event()
            g.waiters.append((asyncio.get_running_loop(), ev))
        await ev.wait()

    def wait_started(self, n: int, timeout_s: float) -> bool:
        """Block (another thread than the engine's loop) until ``n`` requests have started."""
        with self._cv:
            return self._cv.wait_for(lambda: self.started >= n, timeout_s)

    # ------------------------------------------------------------ the seam
    async def judge(self, item: ModerationItem) -> Verdict:
        with self._cv:
            self.started += 1
            self.attempts[item.post_id] += 1
            attempt = self.attempts[item.post_id]
            self._cv.notify_all()
        if self.started >= self.enter_at:
            self.entered.set()
        if self.dead.is_set():
            raise EngineDeadError("connection refused: engine gone")
        exc = self.fail(item, attempt)
        if exc is not None:
            raise exc
        try:
            if self.hang(item.post_id):
                await asyncio.Event().wait()  # a request the engine never answers
            if self.hold(item.post_id):
                await asyncio.to_thread(self.release.wait, 120)
            await self._pass_gate(item.post_id)
            latency = self.latency(item.post_id)
            if latency > 0:
                await asyncio.sleep(latency)  # simulated service time
        except asyncio.CancelledError:
            self.cancelled += 1
            self.cancel_seen.set()
            raise
        self.answered.append(item.post_id)
        return self.verdict(item)

    async def aclose(self) -> None:
        self.closed = True
        self.release.set()


# ------------------------------------------------------------------ batch engine


class FakeBatchEngine:
    """The batch seam (``GuardEngine.moderate``). A batch containing an item for which ``fail`` returns an
    exception raises it (the first such item's), like a poison post failing a whole GPU batch; a batch
    without one gets ``verdict(item)`` per item. ``calls`` lists each call's post ids."""

    name = "fake-batch"
    model_version = "test"
    policy_version = "test"
    taxonomy = None

    def __init__(
        self,
        *,
        fail: Callable[[ModerationItem], BaseException | None] = lambda _it: None,
        verdict: Callable[[ModerationItem], Verdict] = fake_verdict,
    ) -> None:
        self.fail, self.verdict = fail, verdict
        self.calls: list[list[str]] = []
        self.closed = False

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        self.calls.append([it.post_id for it in batch])
        for it in batch:
            exc = self.fail(it)
            if exc is not None:
                raise exc
        return [self.verdict(it) for it in batch]

    def close(self) -> None:
        self.closed = True


# ------------------------------------------------------------------ verdict cache


class InMemoryVerdictCache:
    """``workers.cache.VerdictCache``'s interface (``get_many`` ~ MGET, ``put_many`` ~ SET EX per key,
    ``close``) on a dict. Entries are kept encoded as Redis keeps them (``schemas.wire``), so a verdict
    read back has made the same round trip; each expires ``ttl_s`` after it was written (``clock``).

    ``down`` is an outage: reads are misses and writes are dropped, as ``VerdictCache`` degrades when
    Redis is gone (its circuit breaker is not modelled: the ``Moderator`` never sees it). ``gets`` and
    ``puts`` record the keys of each call."""

    def __init__(self, ttl_s: float = 3600.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.down = False
        self.closed = False
        self.gets: list[list[str]] = []
        self.puts: list[list[str]] = []
        self._clock = clock
        self._data: dict[str, tuple[bytes, float]] = {}

    def get_many(self, keys: Sequence[str]) -> list[CachedVerdict | None]:
        self.gets.append(list(keys))
        if self.down or not keys:
            return [None] * len(keys)
        now = self._clock()
        out: list[CachedVerdict | None] = []
        for k in keys:
            hit = self._data.get(k)
            if hit is not None and hit[1] <= now:
                del self._data[k]
                hit = None
            out.append(decode_cached(hit[0]) if hit is not None else None)
        return out

    def put_many(self, entries: Sequence[tuple[str, CachedVerdict]]) -> None:
        self.puts.append([k for k, _ in entries])
        if self.down:
            return
        expires = self._clock() + self.ttl_s
        for k, v in entries:
            self._data[k] = (encode(v), expires)

    def ttl(self, key: str) -> float | None:
        """Seconds left for ``key`` (None if absent or expired), like Redis's TTL."""
        hit = self._data.get(key)
        if hit is None or hit[1] <= self._clock():
            return None
        return hit[1] - self._clock()

    def __len__(self) -> int:
        now = self._clock()
        return sum(1 for _v, exp in self._data.values() if exp > now)

    def close(self) -> None:
        self.closed = True


# ------------------------------------------------------------------ media fetcher

MediaResult = Image.Image | MediaError | MediaUnavailable | Exception


class FakeMediaFetcher:
    """``workers.media.ImageFetcher`` from a table ``results``: ``"s3://bucket/key"`` → an image (served),
    a ``MediaError`` (the post fails with its first image error), a ``MediaUnavailable`` (the whole call
    raises it: an outage holds the batch), or any other exception (raised from the call: a bug). A ref not
    in the table is ``image_not_found``. Like ``MediaFetcher``, identical refs of one call are fetched
    once. ``results`` may be changed between calls (an outage that ends); ``calls`` lists each call's
    refs per post, ``fetched`` counts fetches per ref."""

    def __init__(self, results: Mapping[str, MediaResult] | None = None) -> None:
        self.results: dict[str, MediaResult] = dict(results or {})
        self.calls: list[list[list[str]]] = []
        self.fetched: Counter[str] = Counter()
        self.closed = False

    def fetch_posts(
        self, refs_per_post: Sequence[Sequence[ImageRef]]
    ) -> list[list[FetchedImage] | MediaError]:
        self.calls.append([[r.uri() for r in refs] for refs in refs_per_post])
        done: dict[ImageRef, FetchedImage | MediaError] = {}
        for refs in refs_per_post:
            for r in refs:
                if r in done:
                    continue
                uri = r.uri()
                self.fetched[uri] += 1
                res = self.results.get(uri, MediaError(ErrorCode.IMAGE_NOT_FOUND, f"{uri}: no such key"))
                if isinstance(res, Image.Image):
                    done[r] = _fetched(r, res)
                elif isinstance(res, MediaError):
                    done[r] = res
                else:
                    raise res  # an outage (MediaUnavailable) or a bug: the whole call fails
        out: list[list[FetchedImage] | MediaError] = []
        for refs in refs_per_post:
            got = [done[r] for r in refs]
            err = next((g for g in got if isinstance(g, MediaError)), None)
            out.append(err if err is not None else [g for g in got if isinstance(g, FetchedImage)])
        return out

    def close(self) -> None:
        self.closed = True


def _fetched(ref: ImageRef, image: Image.Image) -> FetchedImage:
    h = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    nbytes = image.width * image.height * bytes_per_pixel(image.mode)
    return FetchedImage(ref=ref, sha256=h.hexdigest(), nbytes=nbytes, image=image)


# ------------------------------------------------------------------ records


def make_post(
    post_id: str,
    text: str | None = None,
    images: Sequence[str] = (),
    *,
    author: str = "a",
    at: datetime | None = None,
) -> PostEvent:
    """A valid ``PostEvent`` (``images``: ``s3://bucket/key`` refs)."""
    return PostEvent(
        post_id=post_id,
        author_id=author,
        created_at=at or datetime.now(UTC),
        text=text,
        images=list(images),
        locale="en",
    )


def record_of(
    post: PostEvent | bytes | None,
    *,
    topic: str = "posts",
    partition: int = 0,
    offset: int = 0,
    key: bytes | None = None,
) -> Record:
    """The ``Record`` the Kafka worker would build for ``post`` (an event, or raw bytes for a malformed
    one); keyed by ``post_id`` unless ``key`` is given."""
    if isinstance(post, PostEvent):
        return Record(topic, partition, offset, key or post.post_id.encode(), post.model_dump_json().encode())
    return Record(topic, partition, offset, key, post)


def records_of(
    posts: Iterable[PostEvent | bytes | None], *, topic: str = "posts", partition: int = 0, start: int = 0
) -> list[Record]:
    """Consecutive offsets from ``start`` on one partition."""
    return [record_of(p, topic=topic, partition=partition, offset=start + i) for i, p in enumerate(posts)]


class OutcomeRecorder:
    """An ``OutcomeObserver`` (``workers.kafka.checkpoint``): keeps every committed outcome (``keep``), and
    calls ``then`` with each commit's (on the worker's main thread: it may call ``worker.stop()``)."""

    def __init__(self, then: Callable[[list[Outcome]], None] | None = None, *, keep: bool = True) -> None:
        self.outcomes: list[Outcome] = []
        self.commits = 0
        self._then = then
        self._keep = keep

    def on_committed(self, outcomes: Sequence[Outcome]) -> None:
        self.commits += 1
        if self._keep:
            self.outcomes.extend(outcomes)
        if self._then is not None:
            self._then(list(outcomes))
