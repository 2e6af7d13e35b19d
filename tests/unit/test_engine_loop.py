"""The engine thread (``workers.pipeline.engine_loop``) with ``workers.testing.FakeStreamingEngine``: requests
complete out of order, a failing request is that post's (``engine_failed`` after its retries) while a
dead engine raises and is nobody's dead letter, a request that never answers times out. No broker, no
sleeps: completions are released by the test through the fake's gates."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from guard.errors import EngineDeadError, EngineRequestError
from guard.types import ModerationItem, Verdict
from schemas.events import ErrorCode
from workers.pipeline.engine_loop import EngineLoop, Failure
from workers.settings import Settings
from workers.testing import FakeStreamingEngine, fake_verdict

WAIT_S = 10  # an upper bound for a thread hand-off, never a pause


@pytest.fixture
def loops() -> Iterator[list[EngineLoop]]:
    made: list[EngineLoop] = []
    yield made
    for loop in made:
        loop.close(timeout_s=2)


def start(
    loops: list[EngineLoop], engine: FakeStreamingEngine, settings: Settings, **kw: object
) -> EngineLoop:
    loop = EngineLoop(engine, settings.model_copy(update=kw))
    loops.append(loop)
    return loop


def item(pid: str) -> ModerationItem:
    return ModerationItem(pid, f"text of {pid}")


def test_requests_complete_in_the_order_the_engine_answers(
    settings: Settings, loops: list[EngineLoop]
) -> None:
    engine = FakeStreamingEngine()
    ids = ["a", "b", "c", "d"]
    engine.gate(*ids)
    loop = start(loops, engine, settings)
    futures = {pid: loop.submit(loop.judge(item(pid))) for pid in ids}
    assert engine.wait_started(4, WAIT_S), "the requests never reached the engine"
    order: list[str] = []
    for pid in ["c", "a", "d", "b"]:  # the engine answers far out of submission order
        engine.open(pid)
        res = futures[pid].result(timeout=WAIT_S)
        assert res == fake_verdict(item(pid))
        order.append(pid)
        # the rest are still outstanding: each request completes alone
        assert all(not f.done() for p, f in futures.items() if p not in order)
    assert engine.answered == ["c", "a", "d", "b"]


def test_a_failing_request_is_retried_then_that_post_is_engine_failed(
    settings: Settings, loops: list[EngineLoop]
) -> None:
    def fail(it: ModerationItem, attempt: int) -> BaseException | None:
        if it.post_id == "bad":
            return EngineRequestError("400: prompt too long")
        if it.post_id == "flaky" and attempt == 1:
            return EngineRequestError("reset by peer")
        return None

    engine = FakeStreamingEngine(fail=fail)
    loop = start(loops, engine, settings, engine_retries=2)
    futures: dict[str, Future[Verdict | Failure]] = {
        pid: loop.submit(loop.judge(item(pid))) for pid in ("bad", "flaky", "good")
    }
    results = {pid: f.result(timeout=WAIT_S) for pid, f in futures.items()}
    assert results["bad"] == (
        ErrorCode.ENGINE_FAILED,
        "EngineRequestError",
        repr(EngineRequestError("400: prompt too long")),
    )
    assert isinstance(results["flaky"], Verdict) and isinstance(results["good"], Verdict)
    assert engine.attempts == {"bad": 3, "flaky": 2, "good": 1}  # 1 + ENGINE_RETRIES for the bad post


def test_a_dead_engine_raises_and_dead_letters_nobody(settings: Settings, loops: list[EngineLoop]) -> None:
    engine = FakeStreamingEngine(
        fail=lambda it, _n: EngineDeadError("CUDA error: device lost") if it.post_id == "x" else None
    )
    loop = start(loops, engine, settings, engine_retries=3)
    with pytest.raises(EngineDeadError, match="device lost"):
        loop.submit(loop.judge(item("x"))).result(timeout=WAIT_S)
    assert engine.attempts["x"] == 1  # not retried: no request of it can succeed
    engine.dead.set()
    with pytest.raises(EngineDeadError):
        loop.submit(loop.judge(item("y"))).result(timeout=WAIT_S)
    engine.dead.clear()  # back: the same post goes through
    assert isinstance(loop.submit(loop.judge(item("y"))).result(timeout=WAIT_S), Verdict)


def test_a_request_that_never_answers_times_out_twice_then_is_engine_timeout(
    settings: Settings, loops: list[EngineLoop]
) -> None:
    engine = FakeStreamingEngine(hang=lambda pid: pid == "stuck")
    loop = start(loops, engine, settings, engine_timeout_s=0.05)
    stuck = loop.submit(loop.judge(item("stuck")))
    fine = loop.submit(loop.judge(item("fine")))
    assert isinstance(fine.result(timeout=WAIT_S), Verdict)
    res = stuck.result(timeout=WAIT_S)
    assert not isinstance(res, Verdict) and res[0] is ErrorCode.ENGINE_TIMEOUT
    assert engine.attempts["stuck"] == 2 and engine.cancelled == 2
