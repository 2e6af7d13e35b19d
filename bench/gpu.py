"""Section 2: the worker against a continuous-batching GPU (``bench.gpu_sim``), in the same run as the
simulator's capacity.

For each path — ``vllm`` (the in-process streaming engine on the ``SimAsyncLLM`` stand-in, injected
through the engine's ``vllm_llm_factory``) and ``vllm-server`` (the server engine over HTTP to
``bench.sim_server`` in its own process) — and each feed — text only, and 30% image posts whose images
the worker fetches from the real S3 server:

- **capacity**: an ideal client (always 2 × max_num_seqs requests outstanding, every request prepared
  before the clock starts) straight on the simulator's interface — what the simulated GPU delivers;
- **worker**: the streaming worker with default settings (``workers.wiring.build_worker``: real broker,
  S3, Redis) draining a backlog of the same posts;
- **static batches of 32**: the batch-synchronous pattern (submit 32, wait for all of them, repeat) on
  the same simulator — what the old worker's barrier costs.

Every client gets the same posts (so the same output lengths: they are drawn from the content), and a
rate is posts ÷ (last completion − first completion) over the whole run — ramp-up and drain included
alike for every client, group joins and model loads excluded. Mean running sequences per step come from
the simulator's step log over the same wall-clock window. A fourth client, **engine alone**, is an ideal
caller of the engine's own ``judge`` (no Kafka, S3 or cache): it separates the engine's overhead from
the worker's. Latency (post ``created_at`` → verdict decided) is
measured in a separate paced run, posts produced at a fixed fraction of capacity, so it is engine +
worker time rather than backlog queueing.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import aiohttp
import boto3
from confluent_kafka import Producer

from bench.clients import (
    ClientRun,
    keep_in_flight,
    paced_batches,
    paced_streaming,
    percentile,
    static_batches,
    steady_window,
)
from bench.gpu_sim import GpuSim, SimAsyncLLM, SimConfig, mean_running
from bench.sim_server import SimServerProcess
from guard.engines import build_streaming_engine
from guard.engines.server import ServerConfig, request_body
from guard.engines.vllm import build_request
from guard.prompts import PromptSet
from guard.samples import drawn_image, png_bytes
from guard.taxonomy import Taxonomy
from guard.types import ModerationItem
from infra.stack import free_port
from workers.demo.sample_feed import post
from workers.pipeline.records import Outcome
from workers.testing import OutcomeRecorder
from workers.wiring import build_worker

if TYPE_CHECKING:
    from bench.harness import Env

BUCKET = "guardstream-media"
IMAGE_SIZE = (448, 448)  # 256 visual tokens at 28×28 per token
STATIC_BATCH = 32  # the old worker's default MAX_BATCH_SIZE


_SIMS: list[GpuSim] = []  # every in-process simulator of this run: their pacing losses are reported


def _sim(cfg: SimConfig) -> GpuSim:
    sim = GpuSim(cfg)
    _SIMS.append(sim)
    return sim


@dataclass
class Feed:
    name: str
    values: list[bytes]  # the post events, as produced to the posts topic
    items: list[ModerationItem]  # the same posts as the engine sees them (images fetched and decoded)
    image_fraction: float = 0.0


def make_feed(s3_endpoint: str, n: int, image_fraction: float, name: str) -> Feed:
    """``n`` distinct posts; every post whose index falls in the first ``image_fraction`` of each ten
    carries an image uploaded to S3 (16 distinct pictures, each post's text differs)."""
    tag = uuid.uuid4().hex[:6]
    keys: list[str] = []
    images = [drawn_image(i, IMAGE_SIZE) for i in range(16)]
    if image_fraction > 0:
        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        for img in images:
            k = f"bench/{uuid.uuid4().hex}.png"
            s3.put_object(Bucket=BUCKET, Key=k, Body=png_bytes(img))
            keys.append(k)
    per_ten = round(image_fraction * 10)
    values: list[bytes] = []
    items: list[ModerationItem] = []
    for i in range(n):
        pid = f"{tag}-{i}"
        text = f"post {i} of feed {tag}: plans for the weekend and a few photos from the trip"
        if i % 10 < per_ten:
            j = i % len(images)
            values.append(post(pid, f"a{i % 97}", text, [f"s3://{BUCKET}/{keys[j]}"]))
            items.append(ModerationItem(pid, text, (images[j],)))
        else:
            values.append(post(pid, f"a{i % 97}", text))
            items.append(ModerationItem(pid, text))
    return Feed(name, values, items, image_fraction)


@dataclass
class Measured:
    rate: float  # steady-state completions per second
    mean_running: float  # sequences running per step over the same window
    n: int
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    dead_letters: int = 0
    extra: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ ideal clients
def inprocess_client(feed: Feed, sim_cfg: SimConfig, static: bool = False, n: int | None = None) -> Measured:
    """The ideal (or static-batch) client on ``SimAsyncLLM``, prompts rendered as the vllm engine does."""
    prompts = PromptSet(Taxonomy.load())
    items = feed.items[: n or len(feed.items)]
    requests = [build_request(prompts, it) for it in items]
    sp = SimpleNamespace(max_tokens=1024, logprobs=5)
    sim = _sim(sim_cfg)
    llm = SimAsyncLLM(sim)
    run_id = uuid.uuid4().hex[:6]

    async def call(i: int) -> None:
        async for _ in llm.generate(requests[i], sp, f"{run_id}-{i}"):
            pass

    async def main() -> ClientRun:
        if static:
            r = await static_batches(call, len(requests), STATIC_BATCH)
        else:
            r = await keep_in_flight(call, len(requests), 2 * sim_cfg.max_num_seqs)
        await sim.aclose()
        return r

    run = asyncio.run(main())
    t0, t1, k = run.steady_window(0)
    mean, _ = mean_running(sim.step_log, t0, t1)
    return Measured(
        k / (t1 - t0),
        mean,
        len(requests),
        percentile(run.latencies_s, 0.5) * 1e3,
        percentile(run.latencies_s, 0.99) * 1e3,
    )


def paced_designs(feed: Feed, sim_cfg: SimConfig, rate: float, seconds: float) -> dict[str, Measured]:
    """The same arrival process (``rate`` posts/s, text) into the streaming design (each post submitted
    as it arrives) and into the batch design (batches of 32 / 50 ms, one in the engine at a time), each
    on a fresh simulator: latency arrival → verdict at a load both designs sustain."""
    prompts = PromptSet(Taxonomy.load())
    n = max(STATIC_BATCH, int(rate * seconds))
    items = [it for it in feed.items if not it.images][:n]
    requests = [build_request(prompts, it) for it in items]
    sp = SimpleNamespace(max_tokens=1024, logprobs=5)
    out: dict[str, Measured] = {}
    for design in ("streaming", "batches of 32"):
        sim = _sim(sim_cfg)
        llm = SimAsyncLLM(sim)
        run_id = uuid.uuid4().hex[:6]

        async def call(i: int, llm: SimAsyncLLM = llm, run_id: str = run_id) -> None:
            async for _ in llm.generate(requests[i], sp, f"{run_id}-{i}"):
                pass

        async def main(design: str = design, sim: GpuSim = sim) -> list[float]:
            if design == "streaming":
                lat = await paced_streaming(call, len(requests), rate)
            else:
                lat = await paced_batches(call, len(requests), rate, STATIC_BATCH, 0.05)
            await sim.aclose()
            return lat

        lat = asyncio.run(main())
        st = sim.stats()
        out[design] = Measured(
            rate, st.mean_running, len(lat), percentile(lat, 0.5) * 1e3, percentile(lat, 0.99) * 1e3
        )
    return out


def http_client(feed: Feed, server: SimServerProcess) -> Measured:
    """The ideal client over HTTP: aiohttp, bodies built as the server engine builds them, JSON-encoded
    before the clock starts (the client's own CPU must not be what limits it)."""
    prompts = PromptSet(Taxonomy.load())
    cfg = ServerConfig(base_url=server.url)
    bodies = [json.dumps(request_body(cfg, prompts, it)).encode() for it in feed.items]
    in_flight = 2 * server.config.max_num_seqs
    url = server.url + "/chat/completions"

    async def main() -> ClientRun:
        conn = aiohttp.TCPConnector(limit=in_flight)
        async with aiohttp.ClientSession(connector=conn) as session:

            async def call(i: int) -> None:
                async with session.post(
                    url, data=bodies[i], headers={"Content-Type": "application/json"}
                ) as resp:
                    resp.raise_for_status()
                    await resp.read()

            return await keep_in_flight(call, len(bodies), in_flight)

    run = asyncio.run(main())
    t0, t1, k = run.steady_window(0)
    return Measured(
        k / (t1 - t0),
        server.mean_running(t0, t1),
        len(bodies),
        percentile(run.latencies_s, 0.5) * 1e3,
        percentile(run.latencies_s, 0.99) * 1e3,
    )


def engine_alone(feed: Feed, path: str, sim_cfg: SimConfig, server: SimServerProcess | None) -> Measured:
    """An ideal caller of the engine's ``judge`` (built from default settings, as the worker builds it):
    ``max_in_flight`` posts outstanding, images already decoded, no Kafka, S3 or cache."""
    from workers.settings import Settings

    kw: dict[str, Any] = {"engine": path}
    if server is not None:
        kw["vllm_server_url"] = server.url
    config = Settings(**kw).engine_config
    factory = SimFactory(sim_cfg) if path == "vllm" else None
    engine = build_streaming_engine(config, vllm_llm_factory=factory)
    items = feed.items

    async def main() -> ClientRun:
        try:
            return await keep_in_flight(lambda i: engine.judge(items[i]), len(items), engine.max_in_flight)
        finally:
            await engine.aclose()

    run = asyncio.run(main())
    t0, t1, k = run.steady_window(0)
    return Measured(
        k / (t1 - t0),
        _window_running(path, factory, server, t0, t1),
        len(items),
        extra={"max_in_flight": float(engine.max_in_flight)},
    )


# --------------------------------------------------------------------------------------- the worker
class SimFactory:
    """The ``vllm_llm_factory`` the engine calls: a fresh simulator per engine, kept for its step log."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.llms: list[SimAsyncLLM] = []

    def __call__(self, **engine_kwargs: Any) -> SimAsyncLLM:
        llm = SimAsyncLLM(_sim(self.cfg), **engine_kwargs)
        self.llms.append(llm)
        return llm


def _worker_settings(env: Env, path: str, server: SimServerProcess | None, **kw: Any) -> Any:
    base: dict[str, Any] = dict(
        # the Settings defaults (Env's are the overhead benchmark's); nothing GPU-specific is tuned
        max_batch_size=32,
        max_wait_ms=50,
        engine=path,
    )
    if server is not None:
        base["vllm_server_url"] = server.url
    base.update(kw)
    return env.settings(**base)


def _build(s: Any, path: str, factory: SimFactory | None, recorder: OutcomeRecorder) -> Any:
    if path == "vllm":
        assert factory is not None
        engine = build_streaming_engine(s.engine_config, vllm_llm_factory=factory)
        return build_worker(s, engine, observers=[recorder])
    return build_worker(s, observers=[recorder])


def _window_running(
    path: str, factory: SimFactory | None, server: SimServerProcess | None, t0: float, t1: float
) -> float:
    if path == "vllm":
        assert factory is not None and factory.llms
        return mean_running(factory.llms[-1].sim.step_log, t0, t1)[0]
    assert server is not None
    return server.mean_running(t0, t1)


def _verdict_times(outcomes: list[Outcome]) -> tuple[list[float], list[float], int]:
    done, lat = [], []
    dead = 0
    for o in outcomes:
        v = o.verdict
        if v is None:
            dead += 1
            continue
        done.append(v.decided_at.timestamp())
        lat.append((v.decided_at - v.post_created_at).total_seconds())
    return done, lat, dead


def worker_backlog(
    env: Env,
    feed: Feed,
    path: str,
    sim_cfg: SimConfig,
    server: SimServerProcess | None,
    progress: Callable[[str, int], Callable[[list[Outcome]], None]],
) -> Measured:
    s = _worker_settings(env, path, server)
    produce(s.bootstrap_servers, s.posts_topic, feed.values)
    factory = SimFactory(sim_cfg) if path == "vllm" else None
    recorder = OutcomeRecorder(progress(f"worker → {path}, {feed.name}", len(feed.values)))
    worker = _build(s, path, factory, recorder)
    worker.run(until_drained=True)
    done, _, dead = _verdict_times(recorder.outcomes)
    t0, t1, k = steady_window(done, 0)
    return Measured(
        k / (t1 - t0) if t1 > t0 else 0.0,
        _window_running(path, factory, server, t0, t1),
        len(recorder.outcomes),
        dead_letters=dead,
        extra={"max_in_flight": float(getattr(worker, "max_in_flight", 0))},
    )


def worker_paced(
    env: Env,
    make_values: Callable[[int], list[bytes]],
    path: str,
    sim_cfg: SimConfig,
    server: SimServerProcess | None,
    rate: float,
    seconds: float,
) -> Measured:
    """Posts produced at ``rate``/s for ``seconds`` while the worker runs; latency is created → decided."""
    s = _worker_settings(env, path, server)
    n = max(1, int(rate * seconds))
    # one warm-up post first: the paced feed starts once the worker has joined and published it, so
    # the group join is not counted as latency
    warm, *values = make_values(n + 1)  # built before the clock: created_at is stamped at produce
    warm_id = json.loads(warm)["post_id"]
    factory = SimFactory(sim_cfg) if path == "vllm" else None
    seen = [0]
    joined = threading.Event()

    def on_batch(outs: list[Outcome]) -> None:
        seen[0] += len(outs)
        joined.set()
        if seen[0] >= n + 1:
            worker.stop()

    recorder = OutcomeRecorder(on_batch)
    worker = _build(s, path, factory, recorder)

    def producer() -> None:
        p = Producer(
            {"bootstrap.servers": s.bootstrap_servers, "linger.ms": 1, "log.connection.close": False}
        )
        p.produce(s.posts_topic, restamp(warm))
        p.flush(30)
        if not joined.wait(120):
            worker.stop()
            return
        t0 = time.perf_counter()
        for i, v in enumerate(values):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # pacing the offered load, not synchronization
            p.produce(s.posts_topic, restamp(v))
            p.poll(0)
        p.flush(30)

    t = threading.Thread(target=producer, name="paced-producer", daemon=True)
    t.start()
    worker.run()
    t.join(60)
    outs = [o for o in recorder.outcomes if o.post_id != warm_id]
    done, lat, dead = _verdict_times(outs)
    t0, t1, _ = steady_window(done, 0)
    return Measured(
        len(done) / (t1 - t0) if t1 > t0 else 0.0,
        _window_running(path, factory, server, t0, t1),
        len(outs),
        percentile(lat, 0.5) * 1e3,
        percentile(lat, 0.99) * 1e3,
        dead,
    )


def restamp(value: bytes) -> bytes:
    """The post with ``created_at`` = now (it is produced now: latency is measured from here)."""
    from datetime import UTC, datetime

    obj = json.loads(value)
    obj["created_at"] = datetime.now(UTC).isoformat()
    return json.dumps(obj).encode()


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from workers.kafka.topics import produce_all

    produce_all(bootstrap, topic, [(None, v) for v in values])


@contextmanager
def sim_server(cfg: SimConfig) -> Iterator[SimServerProcess]:
    srv = SimServerProcess(free_port(), cfg).start()
    try:
        yield srv
    finally:
        srv.stop()


@dataclass
class Row:
    path: str
    feed: str
    capacity: Measured
    alone: Measured
    worker: Measured
    static: Measured | None = None

    @property
    def ratio(self) -> float:
        return self.worker.rate / self.capacity.rate if self.capacity.rate else 0.0


def run_section(
    env: Env,
    n: int,
    n_static: int,
    paced_s: float,
    report: Callable[[str, list[str], list[list[str]]], None],
    say: Callable[[str], None],
    progress: Callable[[str, int], Callable[[list[Outcome]], None]],
    paths: tuple[str, ...] = ("vllm", "vllm-server"),
    sim_cfg: SimConfig | None = None,
) -> dict[str, Any]:
    cfg = sim_cfg or SimConfig()
    feeds = [make_feed(env.s3, n, 0.0, "text only"), make_feed(env.s3, n, 0.3, "30% images (S3)")]
    rows: list[Row] = []
    paced: dict[tuple[str, str], Measured] = {}  # (path, feed) -> the worker at 0.7 x that feed's capacity
    with sim_server(cfg) as server:
        for path in paths:
            srv = server if path == "vllm-server" else None
            for feed in feeds:
                say(f"   {path}, {feed.name}: ideal client…")
                cap = inprocess_client(feed, cfg) if path == "vllm" else http_client(feed, server)
                static = inprocess_client(feed, cfg, static=True, n=n_static) if path == "vllm" else None
                say(f"   {path}, {feed.name}: engine alone…")
                alone = engine_alone(feed, path, cfg, srv)
                w = worker_backlog(env, feed, path, cfg, srv, progress)
                rows.append(Row(path, feed.name, cap, alone, w, static))
            for feed in feeds:
                rate = 0.7 * next(r.capacity.rate for r in rows if r.path == path and r.feed == feed.name)

                def values(k: int, fraction: float = feed.image_fraction) -> list[bytes]:
                    return make_feed(env.s3, k, fraction, "paced").values

                say(f"   {path}, {feed.name}: paced run at {rate:.0f} posts/s (0.7 × capacity) for latency…")
                paced[(path, feed.name)] = worker_paced(env, values, path, cfg, srv, rate, paced_s)
        server_stats = server.stats()
    # honesty check on the time model: a host stall longer than max_lag_ms is GPU time lost, not caught up
    lost = sum(sim.stats().lag_dropped_s for sim in _SIMS) + float(server_stats["lag_dropped_s"])
    busy = sum(sim.stats().real_busy_s for sim in _SIMS) + float(server_stats["real_busy_s"])

    report(
        "2. continuous-batching GPU (simulated: max_num_seqs "
        f"{cfg.max_num_seqs}, {cfg.step_ms(cfg.max_num_seqs):.1f} ms/step at full batch, lognormal outputs "
        f"median {cfg.median_output_tokens:.0f} tokens, time ×{cfg.time_scale}); worker: default settings",
        [
            "engine path",
            "feed",
            "capacity: ideal client (posts/s)",
            "engine alone (posts/s, ÷ capacity)",
            "worker (posts/s)",
            "worker ÷ capacity",
            "running/step ideal → engine → worker",
            "static batches of 32 ÷ capacity (running/step)",
        ],
        [
            [
                r.path,
                r.feed,
                f"{r.capacity.rate:.1f}",
                f"{r.alone.rate:.1f} ({r.alone.rate / r.capacity.rate:.2f})",
                f"{r.worker.rate:.1f}",
                f"{r.ratio:.2f}",
                f"{r.capacity.mean_running:.0f} → {r.alone.mean_running:.0f} → {r.worker.mean_running:.0f}",
                f"{r.static.rate / r.capacity.rate:.2f} ({r.static.mean_running:.0f})" if r.static else "–",
            ]
            for r in rows
        ],
    )
    text_row = next(r for r in rows if r.static is not None and r.feed == "text only")
    assert text_row.static is not None
    both_rate = 0.7 * text_row.static.rate
    say(f"   streaming vs batch design at {both_rate:.0f} posts/s (0.7 × the batch design's capacity)…")
    designs = paced_designs(feeds[0], cfg, both_rate, paced_s * 2)
    report(
        f"2b. latency arrival → verdict, both designs at {both_rate:.0f} posts/s (0.7 × what static batches "
        "of 32 sustain), engine clients only (no Kafka), same simulator",
        ["design", "posts", "p50 (ms)", "p99 (ms)", "running/step"],
        [
            [d, str(m.n), f"{m.p50_ms:.0f}", f"{m.p99_ms:.0f}", f"{m.mean_running:.0f}"]
            for d, m in designs.items()
        ],
    )
    report(
        "2c. the worker's latency, post created → verdict published, paced at 0.7 × each feed's capacity",
        [
            "engine path",
            "feed",
            "offered (posts/s)",
            "completed (posts/s)",
            "p50 (ms)",
            "p99 (ms)",
            "running/step",
        ],
        [
            [
                p,
                f,
                f"{0.7 * next(r.capacity.rate for r in rows if r.path == p and r.feed == f):.0f}",
                f"{m.rate:.0f}",
                f"{m.p50_ms:.0f}",
                f"{m.p99_ms:.0f}",
                f"{m.mean_running:.0f}",
            ]
            for (p, f), m in paced.items()
        ],
    )
    static_rows = [r for r in rows if r.static is not None]
    if static_rows:
        r0 = static_rows[0]
        assert r0.static is not None
        say(
            "   ideal client's own latency at full load p50/p99 "
            f"{r0.capacity.p50_ms:.0f}/{r0.capacity.p99_ms:.0f} ms; "
            f"static batches of 32: p50/p99 {r0.static.p50_ms:.0f}/{r0.static.p99_ms:.0f} ms per batch — at "
            f"0.7 × capacity the static pattern (≈{r0.static.rate / r0.capacity.rate:.2f} × capacity) "
            "cannot keep up at all, so its latency there grows without bound"
        )
    say(
        f"   simulator pacing: {lost:.2f} s of {busy:.0f} s of simulated GPU time lost to host stalls "
        f"> {cfg.max_lag_ms:.0f} ms (shorter ones are caught up)"
    )
    worst = min(r.ratio for r in rows)
    say(
        f"   worker ÷ capacity: [bold]{' / '.join(f'{r.ratio:.2f}' for r in rows)}[/] "
        f"(target ≥ 0.9; lowest {worst:.2f})"
    )
    return {
        "rows": [
            {
                "path": r.path,
                "feed": r.feed,
                "capacity_posts_s": r.capacity.rate,
                "engine_alone_posts_s": r.alone.rate,
                "engine_alone_running": r.alone.mean_running,
                "engine_max_in_flight": r.alone.extra.get("max_in_flight"),
                "worker_posts_s": r.worker.rate,
                "ratio": r.ratio,
                "ideal_running": r.capacity.mean_running,
                "worker_running": r.worker.mean_running,
                "worker_dead_letters": r.worker.dead_letters,
                "static_ratio": (r.static.rate / r.capacity.rate) if r.static else None,
                "static_running": r.static.mean_running if r.static else None,
            }
            for r in rows
        ],
        "paced": {f"{p}, {f}": vars(m) for (p, f), m in paced.items()},
        "designs_at_batch_load": {d: vars(m) for d, m in designs.items()},
        "sim": vars(cfg),
        "sim_lag_lost_s": lost,
        "sim_busy_s": busy,
    }
