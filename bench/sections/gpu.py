"""Section 2 (``gpu``): the streaming worker against a continuous-batching GPU simulator.

The measurement itself lives in ``bench.gpu`` (clients in ``bench.clients``, the simulator in
``bench.gpu_sim``, its HTTP server in ``bench.sim_server``); this module gives it the run's sizes, the
tables and the progress lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.harness import Ctx, console, section, table
from workers.pipeline.records import Outcome


@section(
    "gpu",
    order=2,
    summary="the streaming worker driving a continuous-batching GPU simulator (bench.gpu_sim) through the "
    "vllm engine (AsyncLLM stand-in) and the vllm-server engine (HTTP), text-only and 30% images with "
    "real S3 fetches, vs an ideal client's capacity and a static-batch client; running sequences per "
    "step; p50/p99 latency at a paced load",
)
def run(ctx: Ctx) -> dict[str, Any]:
    from bench.gpu import run_section

    def progress(label: str, total: int) -> Callable[[list[Outcome]], None]:
        console.print(f"   {label}: {total} posts…")
        return lambda _outs: None

    sizes = ctx.sizes
    return run_section(
        ctx.env, sizes.gpu, sizes.gpu_static, sizes.gpu_paced_s, table, console.print, progress
    )
