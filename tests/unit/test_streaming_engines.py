"""The per-request engine seam: ``AsyncVllmEngine`` on a recording ``AsyncLLM`` stand-in (exact arguments,
out-of-order completion, abort, dead-engine mapping), ``AsyncServerEngine`` over real HTTP against
tests/chat_server.py (concurrency limit across a sharded pool, retries, dead server, credentials),
``MicroBatcher`` and the ``build_streaming_engine`` factory. No GPU, no vLLM."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
import structlog
from structlog.testing import capture_logs

from guard.chat import IMAGE_PLACEHOLDER, render_qwen2_5_vl
from guard.config import CpuConfig, EngineConfig, TransformersConfig
from guard.engines import EngineKind, build_streaming_engine
from guard.engines.server import AsyncServerEngine, ServerConfig
from guard.engines.vllm import AsyncVllmEngine, VllmConfig
from guard.errors import EngineDeadError, EngineError, EngineRequestError
from guard.parser import format_output
from guard.prompts import PromptSet
from guard.samples import drawn_image
from guard.streaming import MicroBatcher
from guard.types import ModerationItem, StreamingEngine, Verdict
from schemas.events import Modality
from tests.chat_server import ChatServer, tokenize
from workers.settings import Settings

T = TypeVar("T")
P_CONFIDENT = math.exp(-0.05) / (math.exp(-0.05) + math.exp(-3.0))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


# ---------------------------------------------------------------------------------- AsyncLLM stand-in
class VllmEngineDeadError(RuntimeError):
    """Stands for ``vllm.v1.engine.exceptions.EngineDeadError`` (matched by class name)."""


VllmEngineDeadError.__name__ = "EngineDeadError"


class EngineGenerateError(RuntimeError):
    """Stands for vLLM's recoverable per-request ``EngineGenerateError``."""


def completion(text: str, finish_reason: str = "stop") -> SimpleNamespace:
    toks = tokenize(text)
    lps = []
    for i, t in enumerate(toks):
        pos = {i: SimpleNamespace(logprob=-0.05 if t in ("uns", "safe") else -0.01, decoded_token=t)}
        if t in ("uns", "safe"):
            pos[10_000 + i] = SimpleNamespace(logprob=-3.0, decoded_token="safe" if t == "uns" else "uns")
        lps.append(pos)
    return SimpleNamespace(
        text=text, token_ids=list(range(len(toks))), logprobs=lps, finish_reason=finish_reason
    )


@dataclass
class FakeAsyncLLM:
    """Records every call; each request waits until the test releases it, so completion order is the
    test's to choose. ``abort`` ends the request with a final ``finish_reason="abort"`` output, as
    vLLM's OutputProcessor.abort_requests does."""

    kwargs: dict[str, Any]
    defaults: dict[str, Any]
    respond: Callable[[dict[str, Any]], str]
    calls: list[tuple[dict[str, Any], Any, str]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    shutdowns: int = 0
    errored: bool = False
    abort_cancels: bool = False  # abort cancels the request's await (as the bench simulator does)
    gates: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    _waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)

    @property
    def model_config(self) -> Any:
        return SimpleNamespace(get_diff_sampling_param=lambda: dict(self.defaults))

    async def generate(
        self, prompt: dict[str, Any], sampling_params: Any, request_id: str
    ) -> AsyncIterator[Any]:
        assert request_id not in self.gates, "request ids must be unique"
        self.calls.append((prompt, sampling_params, request_id))
        gate = self.gates[request_id] = asyncio.get_running_loop().create_future()
        for n, w in self._waiters:
            if len(self.calls) >= n and not w.done():
                w.set_result(None)
        result = await gate
        if isinstance(result, BaseException):
            raise result
        if result == "abort":
            yield SimpleNamespace(request_id=request_id, finished=True, outputs=[completion("", "abort")])
            return
        if result == "nothing":
            return
        yield SimpleNamespace(
            request_id=request_id, finished=True, outputs=[completion(self.respond(prompt))]
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        gate = self.gates.get(request_id)
        if gate is not None and not gate.done():
            if self.abort_cancels:
                gate.cancel()
            else:
                gate.set_result("abort")

    def shutdown(self) -> None:
        self.shutdowns += 1

    async def started(self, n: int) -> None:
        """Until ``n`` generate calls have been made."""
        if len(self.calls) >= n:
            return
        w: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, w))
        await w

    def release(self, i: int, result: Any = "ok") -> None:
        self.gates[self.calls[i][2]].set_result(result)


BAD_IMAGE = drawn_image(66)


def respond(p: dict[str, Any]) -> str:
    image = p.get("multi_modal_data", {}).get("image")
    if "cocaine" in p["prompt"] or image is BAD_IMAGE:
        return format_output(unsafe=True, category="C8S3", reasoning="drug sale")
    return format_output(unsafe=False, reasoning="benign")


CHECKPOINT_DEFAULTS = {"repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}


def make_async_vllm(prompts: PromptSet, **cfg: Any) -> tuple[AsyncVllmEngine, FakeAsyncLLM, dict[str, Any]]:
    holder: dict[str, Any] = {}

    def llm_factory(**kw: Any) -> FakeAsyncLLM:
        holder["llm"] = FakeAsyncLLM(kw, {**CHECKPOINT_DEFAULTS, "max_tokens": 2048}, respond)
        return holder["llm"]

    def sp_factory(**kw: Any) -> dict[str, Any]:
        holder["sp"] = kw
        return {"SamplingParams": kw}

    eng = AsyncVllmEngine(prompts, VllmConfig(model="/models/ProGuard-7B", **cfg), llm_factory, sp_factory)
    return eng, holder["llm"], holder["sp"]


def test_async_vllm_engine_exact_arguments_and_out_of_order_completion(prompts: PromptSet) -> None:
    eng, llm, sp = make_async_vllm(prompts)
    assert isinstance(eng, StreamingEngine)
    assert llm.kwargs == {
        "model": "/models/ProGuard-7B",
        "dtype": "bfloat16",
        "max_model_len": 8192,
        "gpu_memory_utilization": 0.9,
        "max_num_seqs": 128,
        "tensor_parallel_size": 1,
        "limit_mm_per_prompt": {"image": 1},
        "mm_processor_kwargs": {"min_pixels": 3136, "max_pixels": 1003520},
        "enable_prefix_caching": True,
        "seed": 0,
    }
    # the checkpoint's generation_config defaults stay; only our four keys are overridden
    assert sp == {
        "repetition_penalty": 1.05,
        "top_p": 0.001,
        "top_k": 1,
        "temperature": 0.0,
        "max_tokens": 1024,
        "logprobs": 5,
        "seed": 0,
    }
    assert eng.max_in_flight == 256
    img = drawn_image(5)
    items = [
        ModerationItem("t", "Buy cocaine here"),
        ModerationItem("i", None, (img,)),
        ModerationItem("ti", "nice garden", (img,)),
        ModerationItem("m", "two pics", (drawn_image(6), BAD_IMAGE)),
    ]

    async def main() -> list[Verdict]:
        tasks = [asyncio.create_task(eng.judge(it)) for it in items]
        await llm.started(5)  # the two-image post is two requests
        # finish the image post first: it completes while the text post submitted before it still runs
        llm.release(1)
        v_image = await tasks[1]
        assert v_image.safe is True and not tasks[0].done() and not tasks[2].done()
        for i in (4, 2, 3, 0):
            llm.release(i)
        out = [await t for t in tasks]
        assert out[1] is v_image
        await eng.aclose()
        return out

    verdicts = run(main())
    rids = [rid for _, _, rid in llm.calls]
    assert len(set(rids)) == 5 and [r.rsplit("-", 1)[-1] for r in rids] == ["t", "i", "ti", "m", "m"]
    assert all(s == {"SamplingParams": sp} for _, s, _ in llm.calls)
    reqs = [p for p, _, _ in llm.calls]
    t = prompts.render(Modality.TEXT, "Buy cocaine here", 0)
    assert reqs[0] == {"prompt": render_qwen2_5_vl(t.system, t.user, 0)}
    i = prompts.render(Modality.IMAGE, None, 1)
    assert reqs[1]["prompt"] == render_qwen2_5_vl(i.system, i.user, 1)
    assert reqs[1]["prompt"].count(IMAGE_PLACEHOLDER) == 1 and reqs[1]["multi_modal_data"]["image"] is img
    ti = prompts.render(Modality.TEXT_IMAGE, "nice garden", 1)
    assert reqs[2] == {"prompt": render_qwen2_5_vl(ti.system, ti.user, 1), "multi_modal_data": {"image": img}}
    assert [r["multi_modal_data"]["image"] for r in reqs[3:]] == [items[3].images[0], BAD_IMAGE]
    assert [(v.safe, v.subcategory) for v in verdicts] == [
        (False, "C8S3"),
        (True, None),
        (True, None),
        (False, "C8S3"),  # one unsafe image makes the post unsafe
    ]
    assert verdicts[0].p_unsafe == pytest.approx(P_CONFIDENT) and verdicts[0].reasoning == "drug sale"
    assert verdicts[1].p_unsafe == pytest.approx(1 - P_CONFIDENT)
    assert verdicts[3].extra["images_judged"] == "2"
    assert llm.aborted == [] and llm.shutdowns == 1


def test_async_vllm_engine_cancelled_judge_aborts_its_requests(prompts: PromptSet) -> None:
    eng, llm, _ = make_async_vllm(prompts)

    async def main() -> None:
        one = asyncio.create_task(eng.judge(ModerationItem("a", "hello")))
        two = asyncio.create_task(eng.judge(ModerationItem("b", "pics", (drawn_image(1), drawn_image(2)))))
        other = asyncio.create_task(eng.judge(ModerationItem("c", "still wanted")))
        await llm.started(4)
        one.cancel()
        two.cancel()
        for t in (one, two):
            with pytest.raises(asyncio.CancelledError):
                await t
        by_post = {rid: rid.rsplit("-", 1)[-1] for _, _, rid in llm.calls}
        assert sorted(llm.aborted) == sorted(r for r, post in by_post.items() if post in ("a", "b"))
        assert sorted(by_post.values()) == ["a", "b", "b", "c"]
        llm.release(next(i for i, (_, _, r) in enumerate(llm.calls) if by_post[r] == "c"))
        assert (await other).safe is True  # the rest of the engine is unaffected
        assert not eng._live

    run(main())


def test_async_vllm_engine_aclose_aborts_outstanding_and_shuts_down(prompts: PromptSet) -> None:
    eng, llm, _ = make_async_vllm(prompts)

    async def main() -> None:
        tasks = [asyncio.create_task(eng.judge(ModerationItem(str(i), f"post {i}"))) for i in range(3)]
        await llm.started(3)
        await eng.aclose()
        assert sorted(llm.aborted) == sorted(rid for _, _, rid in llm.calls) and llm.shutdowns == 1
        for t in tasks:  # not the posts' fault: they stay unjudged, never dead-lettered
            with pytest.raises(EngineDeadError):
                await t
        with pytest.raises(EngineDeadError, match="closed"):
            await eng.judge(ModerationItem("late", "x"))
        await eng.aclose()
        assert llm.shutdowns == 1

    run(main())


def test_async_vllm_engine_engine_side_cancellation_is_not_the_callers(prompts: PromptSet) -> None:
    eng, llm, _ = make_async_vllm(prompts)
    llm.abort_cancels = True

    async def main() -> None:
        t0 = asyncio.create_task(eng.judge(ModerationItem("0", "x")))
        await llm.started(1)
        llm.gates[llm.calls[0][2]].cancel()  # the engine dropped the request by itself
        with pytest.raises(EngineRequestError, match="cancelled by the engine"):
            await t0
        tasks = [asyncio.create_task(eng.judge(ModerationItem(str(i), "x"))) for i in (1, 2)]
        await llm.started(3)
        await eng.aclose()  # this stand-in's abort cancels the awaits: still "engine closed", not cancelled
        for t in tasks:
            with pytest.raises(EngineDeadError, match="closed"):
                await t

    run(main())


def test_async_vllm_engine_maps_failures(prompts: PromptSet) -> None:
    eng, llm, _ = make_async_vllm(prompts)

    async def main() -> None:
        items = [ModerationItem(str(i), f"post {i}") for i in range(5)]
        tasks = [asyncio.create_task(eng.judge(it)) for it in items]
        await llm.started(5)
        bad = EngineGenerateError("bad image")
        llm.release(0, bad)
        llm.release(1, "abort")  # aborted by the engine (not by us): a per-request failure
        llm.release(2, "nothing")  # stream ended without any output
        llm.release(3)
        with pytest.raises(EngineRequestError, match="bad image") as e0:
            await tasks[0]
        assert e0.value.__cause__ is bad
        with pytest.raises(EngineRequestError, match="aborted"):
            await tasks[1]
        with pytest.raises(EngineRequestError, match="without an output"):
            await tasks[2]
        assert (await tasks[3]).safe is True
        # the engine core died: vLLM's EngineDeadError, whether raised directly or as a cause
        llm.release(4, VllmEngineDeadError())
        with pytest.raises(EngineDeadError):
            await tasks[4]
        t5 = asyncio.create_task(eng.judge(ModerationItem("5", "x")))
        await llm.started(6)
        wrapped = EngineGenerateError("wrapped")
        wrapped.__cause__ = VllmEngineDeadError()
        llm.release(5, wrapped)
        with pytest.raises(EngineDeadError):
            await t5
        # any failure once the engine reports errored is the engine's, not the post's
        llm.errored = True
        t6 = asyncio.create_task(eng.judge(ModerationItem("6", "x")))
        await llm.started(7)
        llm.release(6, RuntimeError("zmq socket closed"))
        with pytest.raises(EngineDeadError, match="zmq"):
            await t6
        assert llm.aborted == []

    run(main())


def test_async_vllm_engine_stand_in_needs_no_vllm(prompts: PromptSet) -> None:
    with pytest.raises(ModuleNotFoundError):  # vllm is the [gpu] extra, absent on CPU machines
        AsyncVllmEngine(prompts)
    llm = FakeAsyncLLM({}, {}, respond)
    eng = AsyncVllmEngine(prompts, VllmConfig(max_in_flight=17), lambda **kw: llm)
    sp = eng.sampling_params  # no SamplingParams factory: a namespace a simulator can read
    assert (sp.temperature, sp.max_tokens, sp.logprobs, sp.seed) == (0.0, 1024, 5, 0)
    assert vars(sp) == {"temperature": 0.0, "max_tokens": 1024, "logprobs": 5, "seed": 0}
    assert eng.max_in_flight == 17


# ------------------------------------------------------------------------------------- server engine
def canned(body: dict[str, Any]) -> str:
    user = body["messages"][1]["content"][-1]["text"]
    if "cocaine" in user:
        return format_output(unsafe=True, category="C8S3", reasoning="drug sale")
    return format_output(unsafe=False, reasoning="benign")


@pytest.fixture
def server() -> Any:
    s = ChatServer(canned).start()
    yield s
    s.stop()


def server_engine(prompts: PromptSet, url: str, **cfg: Any) -> AsyncServerEngine:
    return AsyncServerEngine(prompts, ServerConfig(base_url=url, backoff_base_s=0.01, **cfg))


def test_server_engine_bounds_concurrency_and_completes_out_of_order(
    server: ChatServer, prompts: PromptSet
) -> None:
    server.delay = lambda body: 1.0 if "slow" in body["messages"][1]["content"][-1]["text"] else 0.05
    eng = server_engine(prompts, server.url, max_concurrency=4)
    assert eng.max_in_flight == 4

    async def main() -> list[Verdict]:
        slow = asyncio.create_task(eng.judge(ModerationItem("slow", "a slow one")))
        rest = [asyncio.create_task(eng.judge(ModerationItem(str(i), f"post {i}"))) for i in range(20)]
        done = await asyncio.gather(*rest)
        assert not slow.done(), "fast posts complete while the slow one is still generating"
        out = [await slow, *done]
        await eng.aclose()
        return out

    out = run(main())
    assert all(v.safe is True for v in out)
    assert server.max_in_flight == 4, "the limit is reached and never exceeded"
    assert server.completed[-1] == prompts.render(Modality.TEXT, "a slow one", 0).user
    body = server.requests[0]
    # nothing that would override the server's generation_config defaults besides our four
    assert set(body) == {"model", "messages", "max_tokens", "temperature", "logprobs", "top_logprobs", "seed"}
    assert (body["temperature"], body["max_tokens"], body["top_logprobs"], body["seed"]) == (0.0, 1024, 5, 0)


def test_server_engine_shards_its_pool_and_fills_every_shard_without_overfilling_one(
    server: ChatServer, prompts: PromptSet
) -> None:
    """40 slots over ceil(40/16) = 3 clients of 14 connections. Every third request long, so that
    completions come back out of order (round-robin would pile a 15th request on a busy shard); the
    least-loaded choice never asks a client for more than its pool, and the server sees exactly 40."""
    server.delay = lambda body: 0.6 if "long" in body["messages"][1]["content"][-1]["text"] else 0.05
    eng = server_engine(prompts, server.url, max_concurrency=40)
    assert (eng.http_clients, eng.connections_per_client) == (3, 14)
    assert eng.describe()["http_clients"] == 3
    now: dict[int, int] = {}
    peak: dict[int, int] = {}

    def counted(i: int, post: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(*a: Any, **kw: Any) -> Any:
            now[i] = now.get(i, 0) + 1
            peak[i] = max(peak.get(i, 0), now[i])
            try:
                return await post(*a, **kw)
            finally:
                now[i] -= 1

        return wrapped

    async def main() -> tuple[list[Verdict], list[Any]]:
        shards = eng._shards()
        for i, cl in enumerate(shards):
            cl.post = counted(i, cl.post)  # type: ignore[method-assign]
        texts = [("long " if i % 3 == 0 else "") + f"post {i}" for i in range(160)]
        out = await asyncio.gather(*(eng.judge(ModerationItem(str(i), t)) for i, t in enumerate(texts)))
        await eng.aclose()
        return out, shards

    out, shards = run(main())
    assert len(out) == 160 and all(v.safe is True for v in out)
    assert server.max_in_flight == 40, "the limit is reached and never exceeded across shards"
    assert sorted(peak) == [0, 1, 2] and max(peak.values()) <= 14, peak
    assert sum(peak.values()) >= 40
    assert all(cl.is_closed for cl in shards), "aclose closes every shard"
    with pytest.raises(EngineDeadError):
        run(eng.judge(ModerationItem("late", "after close")))
    # the defaults: 256 slots on 16 clients of 16 connections; 1 slot on one client of 1
    default = server_engine(prompts, server.url)
    assert (default.http_clients, default.connections_per_client) == (16, 16)
    one = server_engine(prompts, server.url, max_concurrency=1)
    assert (one.http_clients, one.connections_per_client) == (1, 1)


def test_server_engine_default_concurrency_is_twice_max_num_seqs(server: ChatServer) -> None:
    # the settings derive the concurrency (VLLM_SERVER_CONCURRENCY unset) from VLLM_MAX_NUM_SEQS
    s = Settings(engine="vllm-server", vllm_server_url=server.url)
    eng = build_streaming_engine(s.engine_config)
    assert isinstance(eng, AsyncServerEngine) and isinstance(eng, StreamingEngine)
    assert eng.config.max_concurrency == 256 and eng.max_in_flight == 256
    s2 = Settings(engine="vllm-server", vllm_server_url=server.url, vllm_max_num_seqs=64, max_in_flight=300)
    eng2 = build_streaming_engine(s2.engine_config)
    assert isinstance(eng2, AsyncServerEngine)
    assert eng2.config.max_concurrency == 128 and eng2.max_in_flight == 300


def test_server_engine_verdicts_and_multi_image(server: ChatServer, prompts: PromptSet) -> None:
    eng = server_engine(prompts, server.url)

    async def main() -> list[Verdict]:
        out = await asyncio.gather(
            eng.judge(ModerationItem("t", "Buy cocaine here")),
            eng.judge(ModerationItem("m", "two pics", (drawn_image(1), drawn_image(2)))),
        )
        await eng.aclose()
        return list(out)

    t, m = run(main())
    assert (t.safe, t.subcategory, t.reasoning) == (False, "C8S3", "drug sale")
    assert t.p_unsafe == pytest.approx(P_CONFIDENT)
    assert m.safe is True and m.extra["images_judged"] == "2" and len(server.images) == 2


def test_server_engine_retries_5xx_per_request(server: ChatServer, prompts: PromptSet) -> None:
    server.fail_first = 2
    eng = server_engine(prompts, server.url, max_concurrency=1)

    async def main() -> list[Verdict]:
        out = await asyncio.gather(*(eng.judge(ModerationItem(str(i), f"post {i}")) for i in range(3)))
        await eng.aclose()
        return list(out)

    assert all(v.safe is True for v in run(main()))
    assert len(server.headers) == 5 and len(server.requests) == 3  # two 503s retried, then answered


def test_server_engine_rides_out_a_5xx_burst_shorter_than_dead_after_s(
    server: ChatServer, prompts: PromptSet
) -> None:
    """503 on every request for 1.5 s from the first one on, then answers: each request keeps retrying
    (infrastructure, not the post) and gets its verdict. Before, each request failed after max_attempts
    (~0.1 s of backoff here): 8 ``EngineRequestError``s, i.e. 8 ``engine_failed`` dead letters for a
    server that came back."""
    server.outage_s = 1.5  # from the first request on
    eng = server_engine(
        prompts, server.url, max_concurrency=8, max_attempts=3, dead_after_s=10.0, backoff_max_s=0.2
    )

    async def main() -> list[Verdict | BaseException]:
        res = await asyncio.gather(
            *(eng.judge(ModerationItem(str(i), f"post {i}")) for i in range(8)), return_exceptions=True
        )
        await eng.aclose()
        return list(res)

    res = run(main())
    assert all(isinstance(v, Verdict) and v.safe is True for v in res), res
    assert len(server.requests) == 8 and len(server.headers) > 3 * 8, "retried past max_attempts"


def test_server_engine_failing_every_request_for_dead_after_s_is_dead_not_the_posts(
    server: ChatServer, prompts: PromptSet
) -> None:
    server.fail_first = 10**6  # every request: 503, for ever
    eng = server_engine(prompts, server.url, dead_after_s=0.4, backoff_max_s=0.05)

    async def main() -> list[BaseException]:
        res = await asyncio.gather(
            *(eng.judge(ModerationItem(str(i), f"post {i}")) for i in range(4)), return_exceptions=True
        )
        await eng.aclose()
        return [r for r in res if isinstance(r, BaseException)]

    t0 = time.monotonic()
    errors = run(main())
    assert len(errors) == 4 and all(type(e) is EngineDeadError for e in errors), errors
    assert "failing every request" in str(errors[0]) and "GUARDSTREAM_VLLM_SERVER_URL" in str(errors[0])
    assert "503" in str(errors[0])
    assert 0.4 <= time.monotonic() - t0 < 10


@pytest.mark.parametrize(
    ("status", "setting"),
    [(401, "GUARDSTREAM_VLLM_SERVER_API_KEY"), (403, "GUARDSTREAM_VLLM_SERVER_API_KEY"), (404, "_MODEL")],
)
def test_server_engine_configuration_refusals_are_dead_at_once(
    server: ChatServer, prompts: PromptSet, status: int, setting: str
) -> None:
    """A wrong API key, URL or model name: no post could get past it, so no post is to blame."""
    server.fail_first, server.fail_status = 10**6, status
    eng = server_engine(prompts, server.url, dead_after_s=60.0)

    async def main() -> BaseException:
        try:
            await eng.judge(ModerationItem("x", "hello"))
        except EngineError as exc:
            return exc
        finally:
            await eng.aclose()
        raise AssertionError("expected a failure")

    exc = run(main())
    assert type(exc) is EngineDeadError and str(status) in str(exc) and setting in str(exc)
    assert len(server.headers) == 1, "not retried: the worker holds the post and retries it with backoff"


def test_server_engine_a_4xx_or_a_malformed_answer_is_the_posts_own(
    server: ChatServer, prompts: PromptSet
) -> None:
    """400 ("prompt too long") fails that request at once, and does not make the server count as failing;
    a 200 that is not a chat completion is that request's error too."""
    server.fail_if = lambda body: 400 if "too long" in body["messages"][1]["content"][-1]["text"] else None
    eng = server_engine(prompts, server.url, dead_after_s=0.0)  # would be dead at the first 5xx

    async def main() -> list[Verdict | BaseException]:
        first = await asyncio.gather(eng.judge(ModerationItem("l", "too long")), return_exceptions=True)
        ok = await eng.judge(ModerationItem("o", "fine"))
        await eng.aclose()
        return [*first, ok]

    bad, ok = run(main())
    assert type(bad) is EngineRequestError and "400" in str(bad)
    assert isinstance(ok, Verdict) and ok.safe is True
    assert len(server.headers) == 2, "the 400 was not retried"
    from guard.engines.server import verdict_from_response

    with pytest.raises(EngineRequestError, match="malformed"):
        verdict_from_response(prompts, ModerationItem("m", "x"), {"choices": []})


def test_server_engine_blames_a_request_the_server_fails_while_answering_others(
    server: ChatServer, prompts: PromptSet
) -> None:
    """A 500 for one post only, for dead_after_s, while the same server answers other posts in between:
    the server is up, so it is that post (``EngineRequestError``: its dead letter after the worker's
    retries), not an outage."""
    server.fail_if = lambda body: 500 if "poison" in body["messages"][1]["content"][-1]["text"] else None
    eng = server_engine(prompts, server.url, dead_after_s=0.5, backoff_max_s=0.05)

    async def main() -> tuple[BaseException | Verdict, int]:
        poison = asyncio.ensure_future(eng.judge(ModerationItem("p", "poison")))
        answered = 0
        while not poison.done():  # other posts keep being answered meanwhile
            await eng.judge(ModerationItem(f"o{answered}", "fine"))
            answered += 1
        (res,) = await asyncio.gather(poison, return_exceptions=True)
        await eng.aclose()
        return res, answered

    res, answered = run(main())
    assert type(res) is EngineRequestError and "500" in str(res) and "answered other requests" in str(res)
    assert answered > 3


def test_dead_server_is_engine_dead_not_per_post_failures(prompts: PromptSet) -> None:
    s = ChatServer(canned).start()
    url = s.url
    s.stop()  # connection refused from now on
    eng = server_engine(prompts, url, dead_after_s=0.3)

    async def main() -> list[BaseException]:
        res = await asyncio.gather(
            *(eng.judge(ModerationItem(str(i), f"post {i}")) for i in range(8)), return_exceptions=True
        )
        await eng.aclose()
        return [r for r in res if isinstance(r, BaseException)]

    t0 = time.monotonic()
    errors = run(main())
    assert len(errors) == 8 and all(type(e) is EngineDeadError for e in errors), errors
    assert "unreachable" in str(errors[0]) and "VLLM_SERVER_URL" in str(errors[0])
    assert time.monotonic() - t0 < 10


def test_server_url_credentials_become_auth_and_never_leak(server: ChatServer, prompts: PromptSet) -> None:
    secret = "s3cr3t-T0KEN"
    url = server.url.replace("http://", f"http://alice:{secret}@")
    eng = server_engine(prompts, url)
    assert secret not in eng.model_version and "alice" not in eng.model_version
    assert eng.model_version == f"ProGuard-7B@{server.url}" and secret not in str(eng.describe())

    async def ok() -> Verdict:
        v = await eng.judge(ModerationItem("a", "hello"))
        await eng.aclose()
        return v

    assert run(ok()).safe is True
    assert server.headers[-1]["Authorization"] == "Basic " + base64.b64encode(
        f"alice:{secret}".encode()
    ).decode("ascii")
    # an API key goes as a bearer token
    keyed = server_engine(prompts, server.url, api_key="k-123")

    async def keyed_ok() -> None:
        await keyed.judge(ModerationItem("b", "hello"))
        await keyed.aclose()

    run(keyed_ok())
    assert server.headers[-1]["Authorization"] == "Bearer k-123"
    # a dead server: retries are logged and errors raised, never with the secret
    gone = ChatServer(canned).start()
    gone.stop()
    dead = server_engine(prompts, gone.url.replace("http://", f"http://alice:{secret}@"), dead_after_s=0.2)

    async def fail() -> BaseException:
        try:
            await dead.judge(ModerationItem("c", "hello"))
        except EngineDeadError as exc:
            return exc
        finally:
            await dead.aclose()
        raise AssertionError("expected EngineDeadError")

    # retries are logged at debug: make sure that level is on, whatever an earlier test configured
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as logs:
            exc = run(fail())
    finally:
        structlog.configure(**saved)
    assert [r["event"] for r in logs if r["log_level"] == "warning"] == ["vllm server failing"]
    assert any(r["event"] == "chat completion retry" for r in logs)
    assert secret not in repr(logs) and secret not in str(exc) and secret not in repr(exc)


def test_server_engine_cancelled_request_frees_its_slot(server: ChatServer, prompts: PromptSet) -> None:
    server.delay = lambda body: 30.0 if "stuck" in body["messages"][1]["content"][-1]["text"] else 0.0
    eng = server_engine(prompts, server.url, max_concurrency=1)

    async def main() -> Verdict:
        stuck = asyncio.create_task(eng.judge(ModerationItem("s", "stuck")))
        nxt = asyncio.create_task(eng.judge(ModerationItem("n", "next")))
        assert await asyncio.to_thread(server.received.wait, 10)  # the stuck one holds the only slot
        assert not nxt.done() and len(server.headers) == 1
        stuck.cancel()
        v = await nxt
        await eng.aclose()
        return v

    assert run(main()).safe is True


# -------------------------------------------------------------------------------------- MicroBatcher
@dataclass
class BatchEngine:
    """A batch-native engine double: records each ``moderate`` batch (post ids); ``poison`` in a text
    fails any batch holding it; ``dead`` makes every call raise ``EngineDeadError``."""

    name: str = "batch-test"
    model_version: str = "m1"
    policy_version: str = "p1"
    dead: bool = False
    closed: bool = False
    batches: list[list[str]] = field(default_factory=list)

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        self.batches.append([it.post_id for it in batch])
        if self.dead:
            raise EngineDeadError("CUDA error: an illegal memory access was encountered")
        if any("poison" in (it.text or "") for it in batch):
            raise EngineError("device-side assert triggered")
        return [Verdict(safe="bad" not in (it.text or ""), raw_output=it.post_id) for it in batch]

    def close(self) -> None:
        self.closed = True


def test_micro_batcher_flushes_at_max_batch_size() -> None:
    inner = BatchEngine()
    mb = MicroBatcher(inner, max_batch_size=4, max_wait_s=60.0)
    assert isinstance(mb, StreamingEngine) and mb.max_in_flight == 8
    assert (mb.name, mb.model_version, mb.policy_version) == ("batch-test", "m1", "p1")

    async def main() -> list[Verdict]:
        out = await asyncio.gather(
            *(mb.judge(ModerationItem(str(i), "bad" if i == 5 else "ok")) for i in range(8))
        )
        await mb.aclose()
        return list(out)

    t0 = time.monotonic()
    out = run(main())
    assert time.monotonic() - t0 < 30, "full batches do not wait for max_wait_s"
    assert inner.batches == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    assert [v.raw_output for v in out] == [str(i) for i in range(8)]
    assert [v.safe for v in out] == [True] * 5 + [False] + [True] * 2
    assert inner.closed


def test_micro_batcher_flushes_a_partial_batch_after_max_wait() -> None:
    inner = BatchEngine()
    mb = MicroBatcher(inner, max_batch_size=32, max_wait_s=0.1)

    async def main() -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(mb.judge(ModerationItem(str(i), "ok")) for i in range(3)))
        waited = time.monotonic() - t0
        await mb.aclose()
        return waited

    assert run(main()) >= 0.09
    assert inner.batches == [["0", "1", "2"]]


def test_micro_batcher_poison_item_fails_only_itself() -> None:
    inner = BatchEngine()
    mb = MicroBatcher(inner, max_batch_size=4, max_wait_s=60.0)

    async def main() -> list[Verdict | BaseException]:
        texts = ["ok", "poison pill", "ok", "bad"]
        res = await asyncio.gather(
            *(mb.judge(ModerationItem(str(i), t)) for i, t in enumerate(texts)), return_exceptions=True
        )
        await mb.aclose()
        return list(res)

    a, b, c, d = run(main())
    assert isinstance(b, EngineError) and "device-side assert" in str(b)
    assert isinstance(a, Verdict) and isinstance(c, Verdict) and isinstance(d, Verdict)
    assert (a.safe, c.safe, d.safe) == (True, True, False)
    assert inner.batches == [["0", "1", "2", "3"], ["0"], ["1"], ["2"], ["3"]]


def test_micro_batcher_engine_death_reaches_every_request_without_bisecting() -> None:
    inner = BatchEngine(dead=True)
    mb = MicroBatcher(inner, max_batch_size=4, max_wait_s=60.0)

    async def main() -> list[Verdict | BaseException]:
        res = await asyncio.gather(
            *(mb.judge(ModerationItem(str(i), "ok")) for i in range(4)), return_exceptions=True
        )
        await mb.aclose()
        return list(res)

    res = run(main())
    assert all(isinstance(r, EngineDeadError) for r in res)
    assert inner.batches == [["0", "1", "2", "3"]]


def test_micro_batcher_skips_cancelled_requests_and_flushes_on_close() -> None:
    inner = BatchEngine()
    mb = MicroBatcher(inner, max_batch_size=8, max_wait_s=60.0)

    async def main() -> None:
        keep = asyncio.create_task(mb.judge(ModerationItem("keep", "ok")))
        drop = asyncio.create_task(mb.judge(ModerationItem("drop", "ok")))
        await asyncio.sleep(0)  # let both enqueue (no flush: 2 < 8 and the timer is a minute away)
        drop.cancel()
        await mb.aclose()  # flushes what is queued instead of waiting for max_wait_s
        assert (await keep).safe is True
        with pytest.raises(asyncio.CancelledError):
            await drop
        with pytest.raises(EngineDeadError, match="closed"):
            await mb.judge(ModerationItem("late", "ok"))

    run(main())
    assert inner.batches == [["keep"]] and inner.closed


# ------------------------------------------------------------------------------------------- factory
def test_build_streaming_engine_selects_each_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    import guard.engines

    built: list[EngineConfig] = []

    def fake_build_engine(config: EngineConfig) -> BatchEngine:
        built.append(config)
        return BatchEngine()

    monkeypatch.setattr(guard.engines, "build_engine", fake_build_engine)  # no MiniLM load in this test
    cpu = build_streaming_engine(EngineKind.CPU, max_batch_size=16, max_wait_s=0.01)
    assert isinstance(cpu, MicroBatcher) and isinstance(cpu, StreamingEngine)
    assert (cpu.max_batch_size, cpu.max_wait_s, cpu.max_in_flight) == (16, 0.01, 32)
    assert isinstance(cpu.engine, BatchEngine)
    opts = TransformersConfig(max_in_flight=5)
    hf = build_streaming_engine(opts, max_batch_size=4)
    assert isinstance(hf, MicroBatcher) and hf.max_in_flight == 5
    assert built == [CpuConfig(), opts]

    async def judge_cpu() -> Verdict:
        v = await cpu.judge(ModerationItem("x", "bad"))
        await cpu.aclose()
        return v

    assert run(judge_cpu()).safe is False
    with pytest.raises(ModuleNotFoundError):
        build_streaming_engine(EngineKind.VLLM)
    llm = FakeAsyncLLM({}, {}, respond)
    seen: dict[str, Any] = {}

    def factory(**kw: Any) -> FakeAsyncLLM:
        seen.update(kw)
        return llm

    v = build_streaming_engine(
        VllmConfig(model="/m", max_num_seqs=64, max_tokens=512), vllm_llm_factory=factory
    )
    assert isinstance(v, AsyncVllmEngine) and v.max_in_flight == 128
    assert seen["model"] == "/m" and seen["max_num_seqs"] == 64 and v.sampling_params.max_tokens == 512
