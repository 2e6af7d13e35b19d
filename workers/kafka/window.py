"""The window: admitted records between consume and publish.

A consumed record enters with its assignment epoch and leaves as a ``Job`` ready to publish (its
verdict or dead letter decided). On the way it may:

- wait, decoded but unfetched, for room in the image budget (``INFLIGHT_IMAGE_BYTES``,
  ``workers.media.ImageBudget``): each image post reserves its worst case before it is fetched, first
  come first served (a large post is never starved; text posts and dead letters of the same batch go
  on), and holds the bytes of its decoded images until its outcome is built;
- be sent to the engine as one request (a cache miss; at most ``max_in_flight`` outstanding), whose
  completion comes back from the engine thread through a queue, in any order;
- be held by an outage — a dead engine (``EngineDeadError``) or an unavailable S3 (``MediaUnavailable``)
  — and retried with backoff (``workers.kafka.outages``); never a dead letter.

Nothing here knows Kafka: the loop (``workers.kafka.worker``) consumes, publishes and commits. A record
of a partition revoked meanwhile (its epoch is no longer current in ``Offsets``) is dropped wherever it is.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from concurrent.futures import CancelledError

import structlog

from guard.errors import EngineDeadError
from guard.types import Verdict
from schemas.events import ErrorCode
from workers.kafka.jobs import Job, tp_of
from workers.kafka.offsets import TP, Offsets
from workers.kafka.outages import Outage
from workers.media import ImageBudget
from workers.observability.sensors import Sensor
from workers.pipeline.engine_loop import EngineLoop
from workers.pipeline.moderator import Moderator
from workers.pipeline.records import Prepared, Record

log = structlog.get_logger(__name__)


class Window:
    def __init__(
        self,
        moderator: Moderator,
        engine: EngineLoop,
        offsets: Offsets,
        images: ImageBudget,
        *,
        engine_outage: Outage,
        media_outage: Outage,
        sensor: Sensor,
        on_readiness: Callable[[], None],
    ) -> None:
        """``on_readiness``: an outage started or ended (the worker re-reports ``/readyz``)."""
        self.moderator = moderator
        self.engine = engine
        self.offsets = offsets
        self.images = images
        self.engine_outage = engine_outage
        self.media_outage = media_outage
        self.sensor = sensor
        self._on_readiness = on_readiness
        self._done: queue.SimpleQueue[Job] = queue.SimpleQueue()  # completions, from the engine thread
        self.in_engine: set[Job] = set()
        self._engine_held: list[Job] = []  # refused by a dead engine: re-submitted after backoff
        self._media_held: list[tuple[int, Record]] = []  # S3 unavailable: prepared again after backoff
        self._budget_held: list[tuple[int, Prepared]] = []  # image posts waiting for the image budget
        self._reported: tuple[int, int, int] | None = None

    # ------------------------------------------------------------ state
    @property
    def outage(self) -> bool:
        return self.engine_outage.is_down or self.media_outage.is_down

    @property
    def admitting(self) -> bool:
        """Room for new records: no outage, and no image post waiting for the image budget."""
        return not (self._budget_held or self.outage)

    @property
    def waiting_for_image_budget(self) -> int:
        return len(self._budget_held)

    @property
    def completions_waiting(self) -> bool:
        return not self._done.empty()

    def quiet(self) -> bool:
        """Nothing in the engine and nothing held."""
        return not (self.in_engine or self._engine_held or self._media_held or self._budget_held)

    def report(self) -> None:
        """Tell the sensor what the window holds, when that changed since the last report."""
        in_flight = (
            len(self.in_engine) + len(self._engine_held) + len(self._media_held) + len(self._budget_held)
        )
        now = (in_flight, self.images.used, len(self._budget_held))
        if now == self._reported:
            return
        self._reported = now
        self.sensor.on_in_flight(in_flight)
        self.sensor.on_image_budget(self.images.used, self.images.capacity, len(self._budget_held))

    # ------------------------------------------------------------ admission
    def admit(self, entered: list[tuple[int, Record]]) -> list[Job]:
        """Decode ``entered`` (epoch, record); admit the image posts the image budget has room for (the
        rest wait, unfetched); prepare the admitted (fetch, hash, cache): misses go to the engine. Returns
        the jobs ready to publish now (cache hits, dead letters)."""
        decoded = self.moderator.decode([r for _e, r in entered])
        return self._route([(epoch, p) for (epoch, _r), p in zip(entered, decoded, strict=True)])

    def _route(self, decoded: list[tuple[int, Prepared]]) -> list[Job]:
        go: list[tuple[int, Prepared]] = []
        reserved = 0
        for epoch, p in decoded:
            refs = p.image_refs
            if refs:
                need = self.images.worst_case(refs)
                # FIFO: no image post overtakes one already waiting (a large post is never starved);
                # text-only posts and dead letters of this batch go on
                if self._budget_held or not self.images.try_reserve(need):
                    self._budget_held.append((epoch, p))
                    continue
                reserved += need
            go.append((epoch, p))
        if not go:
            return []
        try:
            prepared = self.moderator.complete([p for _e, p in go])
        except BaseException:
            self.images.settle(reserved, [])  # nothing of the batch is kept
            raise
        # the worst case reserved becomes the bytes actually decoded, one lease per post
        leases = self.images.settle(reserved, [p.item.images if p.item else () for p in prepared])
        ready: list[Job] = []
        unavailable: list[tuple[int, Record]] = []
        for (epoch, p), lease in zip(go, leases, strict=True):
            if p.unavailable is not None:
                if lease is not None:
                    lease.release()
                unavailable.append((epoch, p.record))
                continue
            job = Job(p, epoch, lease=lease)
            if p.needs_engine:
                self._submit(job)
            else:
                ready.append(job)
        if unavailable:
            self._media_held.extend(unavailable)
            self.media_outage.down(time.monotonic(), prepared[0].unavailable or "S3 unavailable")
            self._on_readiness()
        elif self.media_outage.is_down and any(p.item and p.item.images for p in prepared):
            self.media_outage.up(time.monotonic())
            self._on_readiness()
        return ready

    def admit_waiting(self) -> list[Job]:
        """Admit the image posts that waited for the image budget, as far as it has room now (not during
        an outage). The caller does not call it while it stops admitting (an exactly-once drain, a
        shutdown)."""
        held = self._budget_held
        if not held or self.outage or not self.images.fits(self.images.worst_case(held[0][1].image_refs)):
            return []
        self._budget_held = []
        return self._route([(e, p) for e, p in held if self.offsets.current(tp_of(p.record), e)])

    # ------------------------------------------------------------ engine requests
    def _submit(self, job: Job) -> None:
        assert job.prepared.item is not None
        fut = self.engine.submit(self.engine.judge(job.prepared.item))
        job.future = fut
        self.in_engine.add(job)
        fut.add_done_callback(lambda _f, job=job: self._done.put(job))  # type: ignore[misc]

    def collect(self, block_s: float) -> list[Job]:
        """Finished requests (waiting up to ``block_s`` for the first), ready to publish: a verdict, or
        the request's own failure as the post's dead letter. A dead engine's refusals are held."""
        jobs: list[Job] = []
        try:
            jobs.append(self._done.get(timeout=block_s) if block_s > 0 else self._done.get_nowait())
            while True:
                jobs.append(self._done.get_nowait())
        except queue.Empty:
            pass
        finished: list[Job] = []
        now = time.monotonic()
        for job in jobs:
            self.in_engine.discard(job)
            if not self.offsets.current(job.tp, job.epoch):
                job.release_images()
                continue  # revoked meanwhile: not ours to publish
            assert job.future is not None
            try:
                res = job.future.result()
            except CancelledError:
                job.release_images()
                continue
            except EngineDeadError as exc:
                self._engine_held.append(job)
                self.engine_outage.down(now, repr(exc))
                self._on_readiness()
                continue
            except Exception as exc:  # a bug in the request policy: this post's dead letter, not a crash
                log.error(
                    "engine_request_crashed",
                    post_id=job.prepared.item and job.prepared.item.post_id,
                    exc_info=exc,
                )
                job.prepared.error = (ErrorCode.INTERNAL_ERROR, type(exc).__name__, repr(exc)[:1000])
                finished.append(job)
                continue
            if isinstance(res, Verdict):
                job.prepared.verdict = res
                if self.engine_outage.is_down:
                    self.engine_outage.up(now)
                    self._on_readiness()
            else:
                job.prepared.error = res
            finished.append(job)
        return finished

    # ------------------------------------------------------------ outages
    def retry_outages(self) -> list[Job]:
        """Give up past a deadline (``Unavailable``, exit 3); re-submit what a dead engine refused and
        prepare again what S3 could not serve, when their backoff is over. Returns jobs ready now."""
        now = time.monotonic()
        self.engine_outage.raise_if_overdue(now)
        self.media_outage.raise_if_overdue(now)
        ready: list[Job] = []
        if self._engine_held and self.engine_outage.due(now):
            held, self._engine_held = self._engine_held, []
            for job in held:  # the engine decides whether it is back: the posts themselves are the probe
                self._submit(job)
            self.engine_outage.retried(now)
        if self._media_held and self.media_outage.due(now):
            held_media, self._media_held = self._media_held, []
            self.media_outage.retried(now)
            live = [(e, r) for e, r in held_media if self.offsets.current(tp_of(r), e)]
            if live:
                ready = self.admit(live)
            if not self._media_held:
                self.media_outage.up(now)
                self._on_readiness()
        if not self._engine_held and not self.in_engine and self.engine_outage.is_down:
            self.engine_outage.up(now)  # nothing left that failed: admit again
            self._on_readiness()
        return ready

    # ------------------------------------------------------------ revoke, shutdown
    def drop(self, tps: set[TP]) -> None:
        """Forget partitions: cancel their requests (a late completion is fenced by epoch anyway) and give
        back the images of what they held."""
        for job in [j for j in self.in_engine if j.tp in tps]:
            if job.future is not None:
                job.future.cancel()
        for job in self._engine_held:
            if job.tp in tps:
                job.release_images()
        self._engine_held = [j for j in self._engine_held if j.tp not in tps]
        self._media_held = [(e, r) for e, r in self._media_held if tp_of(r) not in tps]
        self._budget_held = [(e, p) for e, p in self._budget_held if tp_of(p.record) not in tps]

    def close(self, timeout_s: float) -> None:
        """Close the engine; what shutdown left in it (abandoned, uncommitted) gives its images back."""
        self.engine.close(timeout_s)
        for job in [*self.in_engine, *self._engine_held]:
            job.release_images()
        self._budget_held.clear()
