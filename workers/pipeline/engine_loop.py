"""The engine thread: an asyncio event loop that awaits ``StreamingEngine.judge`` once per post.

The main thread (which owns the Kafka clients) submits one coroutine per cache miss with
``asyncio.run_coroutine_threadsafe`` and gets a ``concurrent.futures.Future`` back; the future's done
callback (run on this thread) hands the finished job to the main thread through a thread-safe queue.
Per-request policy lives here too: the engine timeout (a post that times out is retried once, alone,
then dead-lettered ``engine_timeout``), retries of failed requests (``ENGINE_RETRIES``) and the
parse-error retry. ``EngineDeadError`` is never turned into a dead letter: it propagates to the worker,
which stops admitting and retries the post later.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import structlog

from guard.errors import EngineDeadError
from guard.types import ModerationItem, StreamingEngine, Verdict
from schemas.events import ErrorCode
from workers.observability.sensors import Sensor, default_sensor
from workers.settings import ParseErrorPolicy, Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")
Failure = tuple[ErrorCode, str, str]  # code, error class, message: the post's dead letter


class EngineLoop:
    def __init__(self, engine: StreamingEngine, settings: Settings, *, sensor: Sensor | None = None) -> None:
        """``sensor`` is told about each request's latency, failures and timeouts (on this thread)."""
        self.engine = engine
        self.s = settings
        self.sensor = sensor if sensor is not None else default_sensor()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def judge(self, item: ModerationItem) -> Verdict | Failure:
        """One post through the engine, with its timeout and retry policy."""
        s = self.s
        failures = timeouts = 0
        reparsed = False
        while True:
            t0 = time.perf_counter()
            try:
                v = await asyncio.wait_for(self.engine.judge(item), s.engine_timeout_s)
            except TimeoutError:
                timeouts += 1
                self.sensor.on_engine_timeout()
                log.warning("engine_request_timed_out", post_id=item.post_id, attempt=timeouts)
                if timeouts > 1:
                    return (
                        ErrorCode.ENGINE_TIMEOUT,
                        "TimeoutError",
                        f"no answer within {s.engine_timeout_s:g}s, twice (GUARDSTREAM_ENGINE_TIMEOUT_S)",
                    )
                continue
            except EngineDeadError:
                raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self.sensor.on_engine_failure()
                log.warning(
                    "engine_request_failed", post_id=item.post_id, attempt=failures, error=repr(exc)[:300]
                )
                if failures > s.engine_retries:
                    return (ErrorCode.ENGINE_FAILED, type(exc).__name__, repr(exc)[:1000])
                continue
            self.sensor.on_engine_request(time.perf_counter() - t0)
            if v.parse_error and s.on_parse_error is ParseErrorPolicy.RETRY and not reparsed:
                reparsed = True  # once more, alone
                continue
            return v

    def close(self, timeout_s: float) -> None:
        """Close the engine (aborting what it still runs) and stop the loop, within ``timeout_s``."""
        if not self._thread.is_alive():
            return
        fut = self.submit(self.engine.aclose())
        try:
            fut.result(timeout=max(timeout_s, 0.1))
        except Exception as exc:
            log.warning("engine_close_failed", error=repr(exc)[:300])
        try:
            self.submit(_cancel_all()).result(timeout=5)
        except Exception as exc:
            log.warning("engine_cancel_failed", error=repr(exc)[:300])
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


async def _cancel_all() -> None:
    """Requests still running at shutdown (abandoned, uncommitted: re-delivered on restart)."""
    me = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not me]
    for t in rest:
        t.cancel()
    if rest:
        await asyncio.wait(rest, timeout=2)
