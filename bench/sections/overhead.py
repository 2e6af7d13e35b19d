"""Section 1 (``overhead``): what the worker costs per post beyond Kafka itself.

Table 1: the worker (zero-cost engine, Redis cache on) vs a raw confluent-kafka consume→produce→commit
loop (``bench.baselines.run_raw``), and vs the same loop doing only the per-post work no worker can skip
(row 1a: validate, hash, MGET, verdict JSON — ``bench.baselines.minimal_work``), all on the same posts.
Table 1b: the per-stage CPU cost of the worker's pipeline on plain records, without Kafka, against the
raw loop's whole cost per post — the ceiling one process could reach.
"""

from __future__ import annotations

import time
import uuid

from bench.baselines import minimal_work, run_raw
from bench.engines import ZeroCostEngine
from bench.harness import Ctx, Env, console, run_worker, section, seed, table, text_posts
from workers.pipeline.records import Record
from workers.settings import Settings
from workers.wiring import build_moderator


@section(
    "overhead",
    order=1,
    summary="worker (zero-cost engine, Redis cache on) vs a raw confluent-kafka consume→produce→commit "
    "loop, and vs the same loop doing only the per-post work no worker can skip (validate, hash, MGET, "
    "verdict JSON); per-stage CPU cost of the pipeline without Kafka",
)
def run(ctx: Ctx) -> dict[str, float]:
    return bench_overhead(ctx.env, ctx.sizes.overhead)


def bench_overhead(env: Env, n: int) -> dict[str, float]:
    s = env.settings()
    seed(s, text_posts(n, uuid.uuid4().hex[:6]))
    raw = run_raw(s, n, "raw consume→produce")
    minimal = run_raw(s, n, "minimal per-post work", minimal_work(s), group="minimal")
    w = run_worker(s, ZeroCostEngine(), n, "worker (zero-cost engine)")
    ratio = w.rate / raw.rate
    table(
        "1. worker overhead vs raw Kafka (same broker, same posts, commit after ack)",
        ["path", "posts", "posts/s", "× raw"],
        [
            ["raw confluent-kafka loop", str(raw.posts), f"{raw.rate:,.0f}", "1.00"],
            [
                "same loop + minimal per-post work (validate, hash, MGET, verdict JSON)",
                str(minimal.posts),
                f"{minimal.rate:,.0f}",
                f"{minimal.rate / raw.rate:.2f}",
            ],
            ["guardstream worker", str(w.posts), f"{w.rate:,.0f}", f"{ratio:.2f}"],
        ],
    )
    console.print(
        f"   ratio worker/raw = [bold]{ratio:.2f}x[/] (target ≥ 0.5x); the minimal loop reaches "
        f"{minimal.rate / raw.rate:.2f}x, the worker {w.rate / minimal.rate:.2f}x of it"
    )
    stages, cache_off_us = stage_costs(s, min(n, 12_800))
    kafka_us = 1e6 / raw.rate
    table(
        "1b. where a worker's post goes: the pipeline stages without Kafka, µs of CPU per post",
        ["stage", "µs/post", "× raw loop"],
        [[k, f"{v:.1f}", f"{v / kafka_us:.1f}"] for k, v in stages.items()]
        + [["cache off: prepare + finish", f"{cache_off_us:.1f}", f"{cache_off_us / kafka_us:.1f}"]]
        + [["raw loop, all of it", f"{kafka_us:.1f}", "1.0"]],
    )
    python_us = sum(stages.values())
    ceiling = kafka_us / (kafka_us + python_us)
    console.print(
        f"   the stages alone cost {python_us:.1f} µs/post: even with Kafka work as cheap as the raw "
        f"loop's, the worker's ceiling is [bold]{ceiling:.2f}x[/] of raw in one process"
    )
    return {
        "raw_posts_s": raw.rate,
        "minimal_posts_s": minimal.rate,
        "worker_posts_s": w.rate,
        "ratio": ratio,
        "ceiling": ceiling,
        "cache_off_us": cache_off_us,
        **stages,
    }


def stage_costs(s: Settings, n: int) -> tuple[dict[str, float], float]:
    """The worker's per-post stages on plain records (no broker), in batches of ``max_batch_size``:
    CPU µs per post of prepare (decode+validate+hash+cache lookup), the zero-cost engine and finish
    (verdict events+JSON+cache write); and prepare+finish again with the cache off."""
    values = text_posts(n, uuid.uuid4().hex[:6])
    records = [Record(s.kafka.posts_topic, 0, i, None, v) for i, v in enumerate(values)]
    per_post: dict[bool, list[float]] = {}
    for with_cache in (True, False):
        m = build_moderator(s.model_copy(update={"cache_enabled": with_cache}), ZeroCostEngine())
        spent = [0.0, 0.0, 0.0]
        for i in range(0, n, s.max_batch_size):
            t0 = time.process_time()
            prepared = m.prepare(records[i : i + s.max_batch_size])
            t1 = time.process_time()
            m.call_engine(prepared)
            t2 = time.process_time()
            m.finish(prepared)
            t3 = time.process_time()
            spent = [spent[0] + t1 - t0, spent[1] + t2 - t1, spent[2] + t3 - t2]
        m.close()
        per_post[with_cache] = [x / n * 1e6 for x in spent]
    prep, engine, finish = per_post[True]
    off = per_post[False]
    stages = {
        "prepare: decode, validate, hash, MGET": prep,
        "engine (zero-cost)": engine,
        "finish: event, JSON, metrics, SET": finish,
    }
    return stages, off[0] + off[2]
