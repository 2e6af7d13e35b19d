"""Section 5 (``memory``): peak RSS of the worker (zero-cost engine) draining a large backlog.

The parent produces the backlog; the worker drains it in a fresh interpreter (``python -m bench --child
memory SETTINGS_JSON N``, ``drain_child`` below) so the peak RSS it reports is the worker's own, next to
the peak after imports alone.
"""

from __future__ import annotations

import resource
import uuid

from bench.engines import ZeroCostEngine
from bench.harness import Ctx, Env, child, console, run_worker, section, seed, table, text_posts
from workers.settings import Settings


def drain_child(args: list[str]) -> dict[str, float]:
    """Only the worker runs in this process (the backlog was produced by the parent)."""
    settings_json, n_arg = args
    n = int(n_arg)
    s = Settings.model_validate_json(settings_json)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    w = run_worker(s, ZeroCostEngine(), n, f"memory: draining a {n:,}-post backlog")
    return {
        "posts": n,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before / 1024,
        "posts_s": w.rate,
    }


@section(
    "memory",
    order=5,
    summary="peak RSS of the worker draining a 100k-post backlog",
    child=drain_child,
)
def run(ctx: Ctx) -> dict[str, float]:
    return bench_memory(ctx.env, ctx.sizes.memory)


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
