"""guardstream benchmarks on the real local broker (Tansu), S3 server (moto) and Redis.

    python -m bench            # full run, a few minutes on 2 cores
    python -m bench --quick    # small sizes (smoke)

Each section prints a table and a ratio against a baseline measured in the same run:
1. overhead: worker (zero-cost engine, Redis cache on) vs a raw confluent-kafka consume→produce→commit loop,
             and vs the same loop doing only the per-post work no worker can skip (validate, hash,
             MGET, verdict JSON); per-stage CPU cost of the pipeline without Kafka
2. gpu:      the streaming worker driving a continuous-batching GPU simulator (bench.gpu_sim) through
             the vllm engine (AsyncLLM stand-in) and the vllm-server engine (HTTP), text-only and 30%
             images with real S3 fetches, vs an ideal client's capacity and a static-batch client;
             running sequences per step; p50/p99 latency at a paced load
3. cache:    100%-hit stream vs the same worker on misses; hit rate on a stream with duplicates
4. cpu:      the default CPU engine (MiniLM) posts/s and peak RSS
5. memory:   peak RSS of the worker draining a 100k-post backlog
6. image memory (bench/memory.py): peak RSS of the worker path on the worst image feed, image budget on vs off

Throughput is measured from the first published post to the last, so group joins and model loads are
excluded from both sides.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from bench.engines import ZeroCostEngine
from guard.types import GuardEngine
from infra.stack import Broker, RedisServer, S3Server, create_topics, ensure_bucket, free_port
from schemas.codec import decode_post
from schemas.wire import ScoresWire, VerdictWire, encode
from workers.cache import ContentKeyer, VerdictCache
from workers.demo.sample_feed import post
from workers.kafka.topics import produce_all
from workers.observability.logging import configure_logging
from workers.pipeline.records import Outcome, Record
from workers.settings import Settings
from workers.wiring import build_moderator, build_worker

console = Console(width=max(Console().width, 150))  # the tables are wide; a pipe is not a terminal
BUCKET = "guardstream-media"


@dataclass
class Env:
    bootstrap: str
    s3: str
    redis_url: str

    def settings(self, **kw: Any) -> Settings:
        sfx = uuid.uuid4().hex[:8]
        base: dict[str, Any] = dict(
            bootstrap_servers=self.bootstrap,
            group_id=f"bench-{sfx}",
            posts_topic=f"posts-{sfx}",
            verdicts_topic=f"verdicts-{sfx}",
            novel_risk_topic=f"novel-{sfx}",
            dlq_topic=f"dlq-{sfx}",
            s3_endpoint_url=self.s3,
            allowed_buckets=[BUCKET],
            redis_url=self.redis_url,
            session_timeout_ms=6000,
            max_batch_size=256,
            max_wait_ms=50,
            log_format="json",
            log_level="WARNING",
            lag_interval_s=3600,
        )
        base.update(kw)
        s = Settings(**base)
        create_topics(
            s.bootstrap_servers,
            {s.posts_topic: 3, s.verdicts_topic: 3, s.novel_risk_topic: 1, s.dlq_topic: 1},
        )
        return s


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def seed(s: Settings, values: list[bytes]) -> None:
    produce_all(s.bootstrap_servers, s.posts_topic, [(None, v) for v in values])


def text_posts(n: int, tag: str, distinct: int | None = None) -> list[bytes]:
    d = distinct or n
    return [
        post(f"{tag}-{i}", f"a{i % 97}", f"post {i % d} from the benchmark feed about weekend plans {tag}")
        for i in range(n)
    ]


@dataclass
class Run:
    posts: int
    seconds: float
    outcomes: list[Outcome]

    @property
    def rate(self) -> float:
        return self.posts / self.seconds if self.seconds > 0 else 0.0


def run_worker(s: Settings, engine: GuardEngine, n: int, label: str, keep: bool = False) -> Run:
    """The worker draining ``n`` posts. The streaming worker reports outcomes per commit interval (too
    coarse to time a run of a second or two), so the clock is the verdicts' own ``decided_at`` (one per
    group of posts finished together): posts decided after the first group ÷ (last − first decided)."""
    worker = build_worker(s, engine)
    worker.keep_outcomes = keep
    decided = array("d")  # 8 bytes a post: the memory benchmark's peak RSS is not disturbed
    with progress() as prog:
        task = prog.add_task(label, total=n)

        def on_batch(outs: list[Outcome]) -> None:
            decided.extend(o.verdict.decided_at.timestamp() for o in outs if o.verdict is not None)
            prog.advance(task, len(outs))

        worker.run(until_drained=True, on_batch=on_batch)
    if len(decided) < 2:
        return Run(0, 0.0, worker.stats.outcomes)
    first, last = min(decided), max(decided)
    return Run(sum(1 for t in decided if t > first), last - first, worker.stats.outcomes)


Work = Callable[[list[Message]], list[tuple[bytes, bytes | None]]]


def forward(msgs: list[Message]) -> list[tuple[bytes, bytes | None]]:
    """The raw baseline's work: none, each record's bytes go out as they came in."""
    return [(m.value() or b"", m.key()) for m in msgs]


def minimal_work(s: Settings) -> Work:
    """The per-post work no moderation worker can skip, with the worker's own parts and nothing else:
    validate the post (the same pydantic decoder), hash its content, one MGET per batch, and write a
    verdict JSON (the same msgspec encoder). No pipelining, cache write, metrics or bookkeeping."""
    keyer = ContentKeyer(engine="bench-minimal", model_version="none", policy="bench")
    cache = VerdictCache(s.cache.url, s.cache.ttl_s)

    def work(msgs: list[Message]) -> list[tuple[bytes, bytes | None]]:
        posts = [decode_post(m.value()) for m in msgs]
        keys = [keyer(p.modality.value, p.text) for p in posts]
        cache.get_many(keys)
        now = datetime.now(UTC)
        return [
            (
                encode(
                    VerdictWire(
                        post_id=p.post_id,
                        author_id=p.author_id,
                        modality=p.modality,
                        safe=True,
                        scores=ScoresWire(p_unsafe=0.0),
                        engine="bench-minimal",
                        model_version="none",
                        policy_version="bench",
                        content_hash=k,
                        cache_hit=False,
                        latency_ms=0.0,
                        source_topic=s.posts_topic,
                        source_partition=m.partition() or 0,
                        source_offset=m.offset() or 0,
                        post_created_at=p.created_at,
                        decided_at=now,
                    )
                ),
                p.post_id.encode(),
            )
            for m, p, k in zip(msgs, posts, keys, strict=True)
        ]

    return work


def run_raw(s: Settings, n: int, label: str, work: Work = forward, group: str = "raw") -> Run:
    """The baseline loop: consume a batch, produce ``work(batch)`` to the output topic, wait for the acks,
    commit."""
    c = Consumer(
        {
            "bootstrap.servers": s.bootstrap_servers,
            "group.id": f"{s.group_id}-{group}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "log.connection.close": False,
        }
    )
    p = Producer(
        {
            "bootstrap.servers": s.bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "log.connection.close": False,
        }
    )
    c.subscribe([s.posts_topic])
    done = 0
    marks: list[tuple[float, int]] = []
    with progress() as prog:
        task = prog.add_task(label, total=n)
        while done < n:
            msgs = [m for m in c.consume(s.max_batch_size, 0.05) if not m.error()]
            if not msgs:
                continue
            for value, key in work(msgs):
                p.produce(s.verdicts_topic, value, key)
            p.flush(30)
            offs: dict[int, int] = {}
            for m in msgs:
                offs[m.partition() or 0] = max(offs.get(m.partition() or 0, 0), (m.offset() or 0) + 1)
            c.commit(
                offsets=[TopicPartition(s.posts_topic, k, v) for k, v in offs.items()], asynchronous=False
            )
            done += len(msgs)
            marks.append((time.perf_counter(), len(msgs)))
            prog.advance(task, len(msgs))
    c.close()
    return Run(sum(k for _, k in marks[1:]), marks[-1][0] - marks[0][0], [])


def table(title: str, cols: list[str], rows: list[list[str]]) -> None:
    t = Table(title=title)
    for col in cols:
        t.add_column(col)
    for r in rows:
        t.add_row(*r)
    console.print(t)


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
    records = [Record(s.posts_topic, 0, i, None, v) for i, v in enumerate(values)]
    per_post: dict[bool, list[float]] = {}
    for with_cache in (True, False):
        m = build_moderator(s.model_copy(update={"cache_enabled": with_cache}), ZeroCostEngine())
        spent = [0.0, 0.0, 0.0]
        for i in range(0, n, s.max_batch_size):
            t0 = time.process_time()
            prepared = m.prepare(records[i : i + s.max_batch_size])
            t1 = time.process_time()
            m.moderate(prepared)
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


def bench_gpu(env: Env, n: int, n_static: int, paced_s: float) -> dict[str, Any]:
    """Section 2 (``bench.gpu``): the streaming worker against the continuous-batching GPU simulator."""
    from bench.gpu import run_section

    def report(title: str, cols: list[str], rows: list[list[str]]) -> None:
        table(title, cols, rows)

    def progress(label: str, total: int) -> Callable[[list[Outcome]], None]:
        console.print(f"   {label}: {total} posts…")
        return lambda _outs: None

    return run_section(env, n, n_static, paced_s, report, console.print, progress)


def bench_cache(env: Env, n: int, dup_ratio: float = 0.3) -> dict[str, float]:
    tag = uuid.uuid4().hex[:6]
    values = text_posts(n, tag)
    miss_s = env.settings()
    seed(miss_s, values)
    miss = run_worker(miss_s, ZeroCostEngine(), n, "cache: all misses")
    hit_s = env.settings()
    seed(hit_s, values)  # same content again: every lookup hits
    hit = run_worker(hit_s, ZeroCostEngine(), n, "cache: all hits", keep=True)
    hit_rate_full = sum(1 for o in hit.outcomes if o.verdict is not None and o.verdict.cache_hit) / max(
        len(hit.outcomes), 1
    )
    dup_s = env.settings()
    distinct = int(n * (1 - dup_ratio))
    seed(dup_s, text_posts(n, uuid.uuid4().hex[:6], distinct=distinct))
    dup = run_worker(dup_s, ZeroCostEngine(), n, f"cache: {dup_ratio:.0%} reposts", keep=True)
    hits = sum(1 for o in dup.outcomes if o.verdict is not None and o.verdict.cache_hit)
    table(
        "3. verdict cache (Redis, one MGET + one Lua multi-SET per batch)",
        ["stream", "posts/s", "hit rate"],
        [
            ["all misses", f"{miss.rate:,.0f}", "0.00"],
            ["all hits", f"{hit.rate:,.0f}", f"{hit_rate_full:.2f}"],
            [f"{dup_ratio:.0%} reposts", f"{dup.rate:,.0f}", f"{hits / max(len(dup.outcomes), 1):.2f}"],
        ],
    )
    console.print(
        f"   hit-stream / miss-stream = [bold]{hit.rate / miss.rate:.2f}x[/]; expected hit rate on the "
        f"repost stream ≈ {1 - distinct / n:.2f} (within-batch twins miss together)"
    )
    return {
        "miss_posts_s": miss.rate,
        "hit_posts_s": hit.rate,
        "dup_hit_rate": hits / max(len(dup.outcomes), 1),
    }


def child(*args: str) -> dict[str, Any]:
    """Run a measurement in a fresh interpreter so its peak RSS is its own."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--child", *args], capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def bench_cpu_engine(n: int) -> dict[str, Any]:
    """The default CPU engine (MiniLM + trained head) against the prototype engine it replaced, each in a
    fresh interpreter (its own peak RSS), in the same run: short posts in batches of 32, long posts
    (several hundred words: every window embedded) in batches of 8."""
    from guard.cpu_report import speed

    n_long = max(16, n // 16)
    head, proto = speed("head", n, n_long), speed("prototype", n, n_long)
    table(
        "4. default CPU engine (MiniLM + intent head, 2 cores) vs the prototype engine it replaced",
        ["metric", "head", "prototype", "head ÷ prototype"],
        [
            [label, f"{head[k]:.0f}", f"{proto[k]:.0f}", f"{head[k] / max(proto[k], 1e-9):.2f}"]
            for label, k in (
                ("demo-feed posts/s (one line each)", "feed_posts_s"),
                ("short posts/s (held-out dataset rows)", "short_posts_s"),
                (f"long posts/s ({head['long_post_words']:.0f} words)", "long_posts_s"),
                ("peak RSS (MB)", "peak_rss_mb"),
            )
        ],
    )
    return {"head": head, "prototype": proto}


def _memory_child(settings_json: str, n: int) -> dict[str, float]:
    """Only the worker runs in this process (the backlog was produced by the parent)."""
    global console
    console = Console(file=sys.stderr)
    s = Settings.model_validate_json(settings_json)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    w = run_worker(s, ZeroCostEngine(), n, f"memory: draining a {n:,}-post backlog")
    return {
        "posts": n,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before / 1024,
        "posts_s": w.rate,
    }


def bench_memory(env: Env, n: int) -> dict[str, float]:
    s = env.settings(max_batch_size=256)
    with console.status(f"memory: producing a {n:,}-post backlog…"):
        seed(s, text_posts(n, uuid.uuid4().hex[:6]))
    with console.status(f"memory: draining the {n:,}-post backlog in a fresh process…"):
        r = child("memory", s.model_dump_json(), str(n))
    table(
        f"5. worker memory under a {n:,}-post backlog",
        ["metric", "value"],
        [
            ["peak RSS before the worker starts: imports only (MB)", f"{r['rss_before_mb']:.0f}"],
            ["peak RSS draining the backlog (MB)", f"{r['peak_rss_mb']:.0f}"],
            ["posts/s", f"{r['posts_s']:,.0f}"],
        ],
    )
    console.print(
        "   bounded: the worker holds at most MAX_IN_FLIGHT posts in its window (partitions are paused "
        "when it is full); librdkafka's prefetch queue is capped by queued.max.messages.kbytes"
    )
    return dict(r)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--only", default="overhead,gpu,cache,cpu,memory,image-memory")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    configure_logging("json", "WARNING")
    if a.child:
        _kind, settings_json, n = a.child  # the only child: "memory"
        out = _memory_child(settings_json, int(n))
        print(json.dumps(out))
        return 0
    sizes = (
        dict(overhead=2_000, gpu=500, gpu_static=96, gpu_paced_s=6, cache=1_000, cpu=256, memory=5_000)
        if a.quick
        else dict(
            overhead=20_000,
            gpu=2_400,
            gpu_static=480,
            gpu_paced_s=20,
            cache=10_000,
            cpu=2_048,
            memory=100_000,
        )
    )
    redis_server = RedisServer().start()  # our own, so no one else's data is touched
    broker = Broker(port=free_port()).start()
    s3 = S3Server(port=free_port(), process=True).start()
    import boto3

    ensure_bucket(boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1"), BUCKET)
    env = Env(broker.bootstrap, s3.endpoint, redis_server.url)
    results: dict[str, Any] = {}
    try:
        only = set(a.only.split(","))
        if "overhead" in only:
            results["overhead"] = bench_overhead(env, sizes["overhead"])
        if "gpu" in only:
            results["gpu"] = bench_gpu(env, sizes["gpu"], sizes["gpu_static"], sizes["gpu_paced_s"])
        if "cache" in only:
            results["cache"] = bench_cache(env, sizes["cache"])
        if "cpu" in only:
            results["cpu"] = bench_cpu_engine(sizes["cpu"])
        if "memory" in only:
            results["memory"] = bench_memory(env, sizes["memory"])
        if "image-memory" in only:
            from bench.memory import bench_image_memory

            s3c = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
            results["image_memory"] = bench_image_memory(env.settings(), s3c, 32 if a.quick else 128, table)
    finally:
        s3.stop()
        broker.stop()
        redis_server.stop()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
