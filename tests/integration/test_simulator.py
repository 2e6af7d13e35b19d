"""The continuous-batching GPU simulator (bench.gpu_sim) shows what the streaming benchmark measures:
an ideal client keeps ~max_num_seqs sequences running, a static-batch client far fewer; output lengths
are a deterministic, long-tailed function of the content; its outputs are ProGuard-format text the
engines parse; and both faces (AsyncLLM stand-in, OpenAI HTTP server) drive the real engines.

Rates here are in *modelled* time (``Stats.modelled_s``) with ``time_scale=0``, so they do not depend
on how busy this machine is, and the tests take about a second."""

from __future__ import annotations

import asyncio
import statistics
import uuid
from dataclasses import replace

import pytest
from PIL import Image

from bench.clients import keep_in_flight, static_batches
from bench.gpu_sim import (
    GpuSim,
    SimAsyncLLM,
    SimConfig,
    SimRequest,
    Stats,
    content_digest,
    proguard_output,
)
from bench.sim_server import SimServerProcess
from guard.config import ServerConfig, VllmConfig
from guard.engines import build_streaming_engine
from guard.errors import EngineDeadError
from guard.parser import parse_output
from guard.prompts import PromptSet
from guard.samples import drawn_image, png_bytes
from guard.types import ModerationItem, Verdict
from infra.stack import free_port
from tests.conftest import BUCKET, Services
from workers.demo.sample_feed import post
from workers.kafka.topics import produce_all
from workers.settings import Settings
from workers.testing import OutcomeRecorder
from workers.wiring import build_worker

FAST = SimConfig(time_scale=0.0)  # steps as fast as the loop turns; modelled time still counts


def _req(i: int, tag: str = "t", max_tokens: int = 1024) -> SimRequest:
    return SimRequest(f"{tag}-{i}", content_digest(f"post {i} {tag}"), 50, 0, max_tokens)


async def _drive(sim: GpuSim, n: int, *, static: int | None = None, in_flight: int = 256) -> Stats:
    async def call(i: int) -> object:
        return await sim.submit(_req(i))

    if static:
        await static_batches(call, n, static)
    else:
        await keep_in_flight(call, n, in_flight)
    st = sim.stats()
    await sim.aclose()
    return st


def test_step_time_model() -> None:
    c = SimConfig()
    assert c.step_ms(128) == pytest.approx(10.0 + 0.12 * 128)  # ≈ 25 ms at a full batch
    assert 20.0 <= c.step_ms(128) <= 30.0
    assert c.step_ms(1) < c.step_ms(64) < c.step_ms(128)
    assert c.step_ms(64, prefill_tokens=100) == pytest.approx(c.step_ms(64) + 100 * c.prefill_per_token_ms)
    assert c.step_ms(64, visual_tokens=256) == pytest.approx(c.step_ms(64) + 256 * c.vision_per_token_ms)


def test_output_lengths_are_deterministic_long_tailed_and_capped() -> None:
    c = SimConfig()
    digests = [content_digest(f"post number {i}") for i in range(4000)]
    lengths = [c.output_tokens(d) for d in digests]
    assert lengths == [c.output_tokens(content_digest(f"post number {i}")) for i in range(4000)]
    med = statistics.median(lengths)
    assert 135 <= med <= 165
    q = statistics.quantiles(lengths, n=100)
    assert q[96] > 3 * med  # p97: the tail a static batch waits for
    assert min(lengths) >= c.min_output_tokens
    assert max(c.output_tokens(d, max_tokens=200) for d in digests) == 200
    # different content, different length (not a constant)
    assert len(set(lengths)) > 300


def test_outputs_parse_as_proguard_and_truncation_is_a_parse_error(prompts: PromptSet) -> None:
    c = SimConfig()
    verdicts = []
    for i in range(500):
        d = content_digest(f"x{i}")
        out = proguard_output(d, c.output_tokens(d), c)
        assert len(out.tokens) == c.output_tokens(d)
        v = parse_output(out.text, prompts.taxonomy)
        assert not v.parse_error, out.text
        assert (v.safe is False) == out.unsafe
        if out.unsafe:
            assert v.subcategory == out.category
        verdicts.append(v)
    unsafe = sum(1 for v in verdicts if v.safe is False) / len(verdicts)
    assert 0.1 < unsafe < 0.3  # unsafe_fraction 0.2
    d = content_digest("long one")
    cut = proguard_output(d, 400, c, cut_at=40)
    assert cut.finish_reason == "length" and len(cut.tokens) == 40
    assert parse_output(cut.text, prompts.taxonomy).parse_error
    whole = proguard_output(d, 400, c, cut_at=1024)
    assert whole.finish_reason == "stop" and len(whole.tokens) == 400


def test_ideal_client_fills_the_batch_static_batches_do_not() -> None:
    ideal = asyncio.run(_drive(GpuSim(FAST), 4000))
    static = asyncio.run(_drive(GpuSim(FAST), 320, static=32))
    assert ideal.max_running == 128
    assert ideal.mean_running > 110  # ~max_num_seqs every step, except the drain at the end
    assert static.mean_running < 16  # each batch of 32 runs at the speed of its longest output
    ideal_rate = ideal.completed / ideal.modelled_s
    static_rate = static.completed / static.modelled_s
    assert static_rate < 0.35 * ideal_rate
    # the capacity the benchmark compares against: ~26 posts per modelled second on this model
    assert 20 < ideal_rate < 35


def test_waiting_queue_and_max_num_seqs() -> None:
    cfg = replace(FAST, max_num_seqs=8)
    st = asyncio.run(_drive(GpuSim(cfg), 64, in_flight=32))
    assert st.max_running == 8
    assert st.max_waiting >= 24  # 32 outstanding, 8 running: the rest wait to be admitted
    assert st.completed == 64


def test_abort_frees_the_slot_and_ends_the_stream() -> None:
    async def main() -> None:
        sim = GpuSim(replace(FAST, time_scale=1.0))  # ≥ 10 ms per step: still running when aborted
        fut = sim.submit(_req(1))
        await asyncio.sleep(0)  # one turn: the step loop admits it and starts its first step
        assert sim.running == 1
        assert sim.abort("t-1")
        assert (await fut).finish_reason == "abort"
        assert sim.running == 0 and sim.stats().aborted == 1
        assert not sim.abort("t-1")
        await sim.aclose()

    asyncio.run(main())


def test_async_llm_stand_in_drives_the_vllm_engine(prompts: PromptSet) -> None:
    """The in-process vllm engine on the stand-in: verdicts parsed with P(unsafe) from the logprobs,
    the engine kwargs recorded, a dead simulator surfaces as EngineDeadError."""
    made: list[SimAsyncLLM] = []

    def factory(**kw: object) -> SimAsyncLLM:
        llm = SimAsyncLLM(GpuSim(replace(SimConfig(), time_scale=0.0)), **kw)
        made.append(llm)
        return llm

    engine = build_streaming_engine(VllmConfig(), vllm_llm_factory=factory)
    items = [ModerationItem(f"p{i}", f"post {i} about the weekend") for i in range(60)]
    img = Image.new("RGB", (448, 448), (120, 30, 200))
    items.append(ModerationItem("img", None, (img,)))

    async def main() -> None:
        verdicts = await asyncio.gather(*(engine.judge(it) for it in items))
        assert all(not v.parse_error for v in verdicts)
        unsafe = [v for v in verdicts if v.safe is False]
        assert unsafe and all(v.subcategory and v.p_unsafe and v.p_unsafe > 0.9 for v in unsafe)
        assert all(v.p_unsafe is not None and v.p_unsafe < 0.1 for v in verdicts if v.safe)
        # determinism: the same post gets the same verdict text again
        again = await engine.judge(items[0])
        assert again.raw_output == verdicts[0].raw_output
        st = made[0].sim.stats()
        assert st.visual_tokens == 256  # one 448×448 image = 256 patches of 28×28
        made[0].sim.kill()
        with pytest.raises(EngineDeadError):
            await engine.judge(items[1])
        await engine.aclose()

    asyncio.run(main())
    assert made[0].engine_kwargs["max_num_seqs"] == 128
    assert made[0].generate_calls == len(items) + 2  # + the one refused after the kill


def test_http_server_drives_the_server_engine(prompts: PromptSet) -> None:
    cfg = replace(SimConfig(), time_scale=0.0)
    with SimServerProcess(free_port(), cfg) as srv:
        engine = build_streaming_engine(ServerConfig(base_url=srv.url))
        img = Image.new("RGB", (280, 280), (10, 200, 30))
        items = [ModerationItem(f"p{i}", f"post {i} about the weekend") for i in range(20)]
        items.append(ModerationItem("img", "look at this", (img,)))

        async def main() -> list[Verdict]:
            try:
                return list(await asyncio.gather(*(engine.judge(it) for it in items)))
            finally:
                await engine.aclose()

        verdicts = asyncio.run(main())
        assert all(not v.parse_error for v in verdicts)
        assert all(v.p_unsafe is not None for v in verdicts)
        st = srv.stats()
        assert st["completed"] == len(items)
        assert st["visual_tokens"] == 100  # 280×280 / (28×28)


def test_worker_keeps_the_simulated_gpu_full(services: Services, kafka_settings: Settings) -> None:
    """The streaming worker (workers.wiring wiring, real broker, S3 and Redis) on the in-process vllm
    engine over the AsyncLLM stand-in: every post gets exactly one outcome, image posts are fetched and
    judged, and the worker keeps more than max_num_seqs outstanding, so the simulated GPU runs a full
    batch with requests waiting — the batch design (32 at a time) could never reach either."""
    s3 = services.s3_client()
    keys = []
    for i in range(4):
        k = f"sim/{uuid.uuid4().hex}.png"
        s3.put_object(Bucket=BUCKET, Key=k, Body=png_bytes(drawn_image(i, (448, 448))))
        keys.append(k)
    tag = uuid.uuid4().hex[:6]
    n = 400
    # texts without the random tag: output lengths (drawn from the content) are the same every run, so
    # is the number of outputs past max_tokens (truncated → unparseable → dead letter)
    values = [
        post(f"{tag}-{i}", "a", f"post {i} about the weekend", [f"s3://{BUCKET}/{keys[i % 4]}"])
        if i % 10 < 3
        else post(f"{tag}-{i}", "a", f"post {i} about the weekend")
        for i in range(n)
    ]
    produce_all(
        kafka_settings.bootstrap_servers,
        kafka_settings.posts_topic,
        [(f"k{i}", v) for i, v in enumerate(values)],
    )
    made: list[SimAsyncLLM] = []

    def factory(**kw: object) -> SimAsyncLLM:
        made.append(SimAsyncLLM(GpuSim(replace(SimConfig(), time_scale=0.05)), **kw))
        return made[-1]

    s = kafka_settings.model_copy(update={"engine": "vllm"})
    engine = build_streaming_engine(s.engine_config, vllm_llm_factory=factory)
    recorder = OutcomeRecorder()
    build_worker(s, engine, observers=[recorder]).run(until_drained=True)
    outs = recorder.outcomes
    assert sorted(o.post_id or "" for o in outs) == sorted(f"{tag}-{i}" for i in range(n))
    verdicts = [o.verdict for o in outs if o.verdict is not None]
    # the only dead letters the simulator can cause: an output past max_tokens (truncated, unparseable)
    assert all(o.dead_letter.error_code == "engine_output_unparseable" for o in outs if o.dead_letter)
    assert len(verdicts) >= n - 3
    assert sum(1 for v in verdicts if v.modality.value == "text_image") >= 100
    assert all(v.scores.p_unsafe is not None for v in verdicts)
    assert any(v.safe is False and v.subcategory for v in verdicts)
    st = made[0].sim.stats()
    assert st.completed == n
    assert st.max_running == 128
    assert st.max_waiting > 0  # more than max_num_seqs outstanding: slots refill the step they free
