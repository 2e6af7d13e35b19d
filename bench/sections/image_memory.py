"""Section 6 (``image-memory``, ``--json`` key ``image_memory``): peak RSS of the worker path on the
worst image feed, image budget on vs off.

The measurement (feed, engine holding the window, fresh interpreters) lives in ``bench.memory``, shared
with ``tests/chaos/test_memory.py``; this module gives it a base configuration, the S3 client and the
table printer.
"""

from __future__ import annotations

from typing import Any

from bench.harness import Ctx, section, table


@section(
    "image-memory",
    order=6,
    key="image_memory",
    summary="peak RSS of the worker path on the worst image feed, image budget on vs off (bench/memory.py)",
)
def run(ctx: Ctx) -> dict[str, Any]:
    from bench.memory import bench_image_memory

    s3c = ctx.env.s3_client()
    return bench_image_memory(ctx.env.settings(), s3c, ctx.sizes.image_memory, table)
