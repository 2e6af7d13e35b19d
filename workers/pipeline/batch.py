"""The batch engine path (replay, offline tools, the bench): ``GuardEngine.moderate`` on a list of cache
misses, retried, then bisected so that a poison post fails alone.

The streaming worker does not come here: it awaits ``StreamingEngine.judge`` once per post
(``workers.pipeline.engine_loop``), where one post's failure is that post's own.
"""

from __future__ import annotations

import time

import structlog

from guard.errors import EngineDeadError, EngineError
from guard.types import GuardEngine
from schemas.events import ErrorCode
from workers.observability.sensors import Sensor
from workers.pipeline.records import Prepared

log = structlog.get_logger(__name__)


def judge_batch(engine: GuardEngine, items: list[Prepared], *, retries: int, sensor: Sensor) -> None:
    """Set each item's ``verdict`` from one ``moderate`` call; on failure retry (``retries`` times, the
    setting ``ENGINE_RETRIES``), then split the batch in two and judge each half, down to the one post
    whose failure is its dead letter (``engine_failed``). A dead engine (``EngineDeadError``) is no
    post's fault: it is raised, never retried item by item nor dead-lettered."""
    batch = [p.item for p in items if p.item is not None]
    last: Exception | None = None
    for attempt in range(retries + 1):
        t0 = time.perf_counter()
        try:
            verdicts = engine.moderate(batch)
            if len(verdicts) != len(batch):
                raise EngineError(f"engine returned {len(verdicts)} verdicts for {len(batch)} items")
        except EngineDeadError:
            sensor.on_engine_failure()
            raise
        except Exception as exc:
            sensor.on_engine_failure()
            last = exc
            log.warning("engine_batch_failed", size=len(batch), attempt=attempt, error=repr(exc)[:300])
            continue
        sensor.on_engine_batch(len(batch), time.perf_counter() - t0)
        for p, v in zip(items, verdicts, strict=True):
            p.verdict = v
        return
    if len(items) == 1:
        items[0].error = (ErrorCode.ENGINE_FAILED, type(last).__name__, repr(last)[:1000])
        return
    mid = len(items) // 2
    judge_batch(engine, items[:mid], retries=retries, sensor=sensor)
    judge_batch(engine, items[mid:], retries=retries, sensor=sensor)
