"""Section 3 (``cache``): the Redis verdict cache, with the zero-cost engine so the worker is all there
is to save.

The same posts twice — first every lookup misses, then every lookup hits — and a stream with 30%
reposts for the hit rate (twins in the same batch miss together, so it sits below 0.30).
"""

from __future__ import annotations

import uuid

from bench.engines import ZeroCostEngine
from bench.harness import Ctx, Env, console, run_worker, section, seed, table, text_posts


@section(
    "cache",
    order=3,
    summary="100%-hit stream vs the same worker on misses; hit rate on a stream with duplicates",
)
def run(ctx: Ctx) -> dict[str, float]:
    return bench_cache(ctx.env, ctx.sizes.cache)


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
