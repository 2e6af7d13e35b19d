"""Section 4 (``cpu``): the default CPU engine (MiniLM + trained intent head) against the prototype
engine it replaced, each in a fresh interpreter (``guard.engines.cpu.report.speed``: its own peak RSS), in the
same run: short posts in batches of 32, long posts (several hundred words: every window embedded) in
batches of 8.
"""

from __future__ import annotations

from typing import Any

from bench.harness import Ctx, section, table


@section("cpu", order=4, summary="the default CPU engine (MiniLM) posts/s and peak RSS")
def run(ctx: Ctx) -> dict[str, Any]:
    return bench_cpu_engine(ctx.sizes.cpu)


def bench_cpu_engine(n: int) -> dict[str, Any]:
    from guard.engines.cpu.report import speed

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
