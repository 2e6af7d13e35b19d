"""Image memory of the worker path (issue 13 item 2): peak RSS of the real ``KafkaWorker`` on the worst feed.

The feed: posts × 4 *distinct* refs to a 2048² PNG (18 KB on S3, 16 MiB decoded; no dedup possible), a
large ``MAX_IN_FLIGHT`` and an engine (``FullWindowEngine``) that answers only when every post not yet
answered is outstanding or the worker waits for its image budget — so each post the worker lets in stays
held, the window's worst case. Run twice in fresh interpreters, with ``GUARDSTREAM_INFLIGHT_IMAGE_BYTES``
on and with it disabled (huge): the difference is what the budget bounds.

Used by ``make bench`` (``bench_image_memory``) and ``tests/chaos/test_memory.py`` (``worker_image_run``).
The child is ``python -m bench.memory CONFIG_JSON``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from guard.types import ModerationItem, Verdict
from infra.stack import create_topics
from workers.demo.sample_feed import post
from workers.kafka.topics import produce_all
from workers.kafka.worker import KafkaWorker
from workers.settings import Settings

BUCKET = "guardstream-media"
REFS_PER_POST = 4
UNBOUNDED = 1 << 50  # "budget off": larger than any feed


class FullWindowEngine:
    """Holds every request until all the posts not yet answered are outstanding, or the worker waits for
    the image budget (nothing more can come in), then answers them all at once."""

    name, model_version, policy_version = "full-window", "bench", "bench"

    def __init__(self, total: int, max_in_flight: int) -> None:
        self.total, self.max_in_flight = total, max_in_flight
        self.answered = 0
        self.max_outstanding = 0
        self.worker: KafkaWorker | None = None
        self._outstanding: list[asyncio.Future[None]] = []
        self._ctl: asyncio.Task[None] | None = None

    async def judge(self, item: ModerationItem) -> Verdict:
        if self._ctl is None:
            self._ctl = asyncio.create_task(self._control())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outstanding.append(done)
        self.max_outstanding = max(self.max_outstanding, len(self._outstanding))
        await done
        return Verdict(safe=True, p_unsafe=0.1)

    async def _control(self) -> None:
        assert self.worker is not None
        while self.answered < self.total:
            n = len(self._outstanding)
            if n and (n >= self.total - self.answered or self.worker.waiting_for_image_budget):
                batch, self._outstanding = self._outstanding, []
                self.answered += len(batch)
                for f in batch:
                    if not f.done():
                        f.set_result(None)
            await asyncio.sleep(0.01)  # the engine polls the window it sees; nothing waits on this

    async def aclose(self) -> None:
        for f in self._outstanding:
            f.cancel()
        if self._ctl is not None:
            self._ctl.cancel()


def png_2048() -> bytes:
    y, x = np.mgrid[0:2048, 0:2048]
    buf = io.BytesIO()
    img = Image.fromarray(((x // 64 + y // 64) % 2 * 255).astype(np.uint8)).convert("RGB")
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(cfg: dict[str, Any]) -> dict[str, int]:
    from schemas.events import ImageRef
    from workers.observability.logging import configure_logging
    from workers.wiring import build_worker

    configure_logging("json", "WARNING")
    s = Settings.model_validate_json(cfg["settings"])
    engine = FullWindowEngine(cfg["total"], s.engine_config.max_in_flight or 256)
    worker = build_worker(s, engine)
    engine.worker = worker
    assert worker.moderator.fetcher is not None
    worker.moderator.fetcher.fetch_posts([[ImageRef.parse(cfg["warmup"])]])  # pools, plugins, botocore
    # The high-water mark so far is imports and client set-up: reset it (Linux clear_refs "5" resets
    # VmHWM), so the peak read below is the run's own.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _rss()
    stats = worker.run(until_drained=True)
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    return {
        "before": before,
        "peak": peak,
        "verdicts": stats.verdicts,
        "consumed": stats.consumed,
        "max_outstanding": engine.max_outstanding,
        "budget_peak": worker.images.peak,
        "budget_used_after": worker.images.used,
    }


def worker_image_run(
    base: Settings, s3: Any, posts: int, budget: int, *, settings: dict[str, Any] | None = None
) -> dict[str, int]:
    """Seed a worst feed of ``posts`` posts (its own topic, group and objects; ``s3`` a boto3 client) and
    run the worker over it in a fresh interpreter with ``INFLIGHT_IMAGE_BYTES=budget``. Returns the
    child's figures plus ``growth`` (peak RSS over the RSS before the run) in bytes."""
    tag = uuid.uuid4().hex[:8]
    body = png_2048()
    keys = [[f"window-{tag}/{i}-{j}.png" for j in range(REFS_PER_POST)] for i in range(posts)]
    for k in (k for ks in keys for k in ks):
        s3.put_object(Bucket=BUCKET, Key=k, Body=body)
    warm = f"window-{tag}/warm.png"
    small = io.BytesIO()
    Image.new("RGB", (8, 8)).save(small, format="PNG")
    s3.put_object(Bucket=BUCKET, Key=warm, Body=small.getvalue())
    s = base.model_copy(
        update={
            "posts_topic": f"window-{tag}",
            "group_id": f"window-{tag}",
            "cache_enabled": False,
            "max_in_flight": 256,
            "inflight_image_bytes": budget,
            "log_level": "WARNING",
            **(settings or {}),
        }
    )
    create_topics(s.kafka.bootstrap_servers, {s.kafka.posts_topic: 1})
    produce_all(
        s.kafka.bootstrap_servers,
        s.kafka.posts_topic,
        [
            (f"w{i}".encode(), post(f"w{i}", "a", f"caption {i}", [f"s3://{BUCKET}/{k}" for k in ks]))
            for i, ks in enumerate(keys)
        ],
    )
    cfg = {"settings": s.model_dump_json(), "total": posts, "warmup": f"s3://{BUCKET}/{warm}"}
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", **os.environ}
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory", json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"image-memory child failed:\n{out.stderr[-3000:]}")
    res: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    res["growth"] = res["peak"] - res["before"]
    return res


def bench_image_memory(
    base: Settings, s3: Any, posts: int, table: Callable[[str, list[str], list[list[str]]], None]
) -> dict[str, Any]:
    """``make bench``: the worst feed with the shipped defaults (``VLLM_MAX_PIXELS``, budgets), budget on
    vs off, in the same run."""
    on = worker_image_run(base, s3, posts, base.media.inflight_image_bytes)
    off = worker_image_run(base, s3, posts, UNBOUNDED)
    mib = 1 << 20
    bound = base.media.inflight_image_bytes + base.media.decode_budget_bytes

    def row(label: str, r: dict[str, int]) -> list[str]:
        return [
            label,
            f"{r['growth'] / mib:.0f}",
            f"{r['peak'] / mib:.0f}",
            f"{r['budget_peak'] / mib:.0f}",
            str(r["max_outstanding"]),
            str(r["verdicts"]),
        ]

    table(
        f"6. image memory: worker path, {posts} posts × {REFS_PER_POST} distinct refs to a 2048² PNG, "
        f"MAX_IN_FLIGHT 256, engine holding the window (INFLIGHT_IMAGE_BYTES "
        f"{base.media.inflight_image_bytes // mib} MiB + DECODE_BUDGET_BYTES "
        f"{base.media.decode_budget_bytes // mib} MiB "
        f"= {bound // mib} MiB)",
        ["image budget", "RSS growth (MiB)", "peak RSS (MiB)", "budget peak (MiB)", "in engine", "verdicts"],
        [row(f"on ({base.media.inflight_image_bytes // mib} MiB)", on), row("off (unbounded)", off)],
    )
    return {"posts": posts, "on": on, "off": off, "off_over_on": off["growth"] / max(on["growth"], 1)}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
