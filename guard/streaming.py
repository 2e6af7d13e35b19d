"""Batch-native engines behind the per-request seam.

``MicroBatcher`` turns a ``GuardEngine`` (``moderate(batch) -> verdicts``) into a ``StreamingEngine``:
``judge`` calls queue up and are flushed as one batch when ``max_batch_size`` items are waiting or the
oldest has waited ``max_wait_s``. The batch runs on a worker thread (the model call releases the GIL),
and while it runs the next batch fills, so a CPU or transformers engine keeps the worker's single path.
A failing batch is re-run item by item, so one poison item fails only its own request. An
``EngineDeadError`` (the device or the engine is gone: no post is to blame) is not re-run: it is handed
to every request of the batch, and of the item-by-item re-run when the engine dies during one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from guard.errors import EngineDeadError, EngineError
from guard.types import GuardEngine, ModerationItem, Verdict


@dataclass(slots=True)
class _Pending:
    item: ModerationItem
    future: asyncio.Future[Verdict]


class MicroBatcher:
    def __init__(
        self,
        engine: GuardEngine,
        max_batch_size: int = 32,
        max_wait_s: float = 0.02,
        max_concurrent_batches: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1 (MAX_BATCH_SIZE)")
        if max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be >= 1")
        self.engine = engine
        self.name = engine.name
        self.model_version = engine.model_version
        self.policy_version = engine.policy_version
        self.taxonomy = getattr(engine, "taxonomy", None)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        # enough requests outstanding to fill the batch being gathered while one runs
        self.max_in_flight = max_batch_size * (max_concurrent_batches + 1)
        self._queue: list[_Pending] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def judge(self, item: ModerationItem) -> Verdict:
        if self._closed:
            raise EngineDeadError("engine closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Verdict] = loop.create_future()
        self._queue.append(_Pending(item, fut))
        if len(self._queue) >= self.max_batch_size:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(self.max_wait_s, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch_size], self._queue[self.max_batch_size :]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Pending]) -> None:
        async with self._slots:
            live = [p for p in batch if not p.future.done()]  # a cancelled request is not run
            if not live:
                return
            try:
                verdicts = await asyncio.to_thread(self.engine.moderate, [p.item for p in live])
                if len(verdicts) != len(live):
                    raise EngineError(f"engine returned {len(verdicts)} verdicts for {len(live)} items")
            except EngineDeadError as exc:
                for p in live:
                    _settle(p.future, exc=exc)
                return
            except Exception as exc:
                if len(live) == 1:
                    _settle(live[0].future, exc=exc)
                    return
                # isolate the failing item(s): each request gets its own result or its own error
                for i, p in enumerate(live):
                    if p.future.done():
                        continue
                    try:
                        (v,) = await asyncio.to_thread(self.engine.moderate, [p.item])
                    except EngineDeadError as dead:  # the engine died meanwhile: nobody's fault
                        for rest in live[i:]:
                            _settle(rest.future, exc=dead)
                        return
                    except Exception as one:
                        _settle(p.future, exc=one)
                    else:
                        _settle(p.future, v)
                return
            for p, v in zip(live, verdicts, strict=True):
                _settle(p.future, v)

    async def aclose(self) -> None:
        self._closed = True
        if self._queue:
            self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.engine.close)


def _settle(fut: asyncio.Future[Verdict], v: Verdict | None = None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        assert v is not None
        fut.set_result(v)
