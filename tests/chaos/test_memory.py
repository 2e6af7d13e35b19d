"""Image memory is bounded by design (issue 13, item 2), measured as peak RSS in a fresh subprocess.

The feeds are the worst ones from the issue, fetched from the real S3 server through ``fetch_posts``:

- a 91 KB 16-bit grayscale PNG of 39.7 MP (under every byte and pixel cap; +897 MB per decode before,
  16 posts × 4 refs to it took 13.9 GB);
- 64 posts × 4 refs to an 18 KB 2048² PNG (5.1 GB before);
- 8 *distinct* objects holding the 39.7 MP PNG (no dedup possible: only the decode budget bounds it).

The bound stated (README, failure table): peak RSS growth over the process's RSS before the batch is at
most ``decode budget + refs × target_pixels × 4 B (the decoded RGB thumbnails a batch keeps) + 96 MiB``
(allocator slack, S3 bodies, thread stacks).

The worker path (``GUARDSTREAM_INFLIGHT_IMAGE_BYTES``): the real ``KafkaWorker`` on the real broker and S3
server, 64 posts × 4 *distinct* refs to a 2048² PNG, ``MAX_IN_FLIGHT`` 256 and an engine that answers only
when the window is full or the worker waits for the image budget, so every post the worker admits stays
held. Bound: peak RSS growth ≤ image budget + decode budget + 96 MiB. The same run with the budget
disabled (huge) holds every post's thumbnails at once and must exceed that bound — so the test can fail.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from PIL import Image

from bench.memory import UNBOUNDED, worker_image_run
from tests.conftest import BUCKET, Services
from workers.settings import Settings

TARGET_PIXELS = 1280 * 28 * 28  # the vLLM engines' default pixel bound
BUDGET = 256 << 20
SLACK = 96 << 20

CHILD = r"""
import json, resource, sys
from workers.media import MediaFetcher, make_s3_client
from schemas.events import ImageRef

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

cfg = json.loads(sys.argv[1])
client = make_s3_client(cfg["endpoint"], "us-east-1", 2)
f = MediaFetcher(client, [cfg["bucket"]], max_bytes=10 << 20, max_pixels=40_000_000, concurrency=16,
                 target_pixels=cfg["target"], decode_budget_bytes=cfg["budget"])
f.fetch_posts([[ImageRef(bucket=cfg["bucket"], key=cfg["warmup"])]])  # imports, pools, plugin init
# The high-water mark so far is boto3's client set-up (service models), not ours: reset it (Linux
# clear_refs "5" resets VmHWM, the figure getrusage's ru_maxrss reports for this process).
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = rss()
res = f.fetch_posts([[ImageRef(bucket=cfg["bucket"], key=k) for k in post] for post in cfg["posts"]])
with open("/proc/self/status") as fh:
    peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
print("ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)
ok = sum(isinstance(r, list) for r in res)
print(json.dumps({"before": before, "peak": peak, "ok": ok, "budget_peak": f.budget.peak}))
"""


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def png16_39mp() -> bytes:
    a = np.zeros((5440, 7300), dtype=np.uint16)
    a[:, :3650] = 40000
    a[::97, :] = 1234
    return _png(Image.fromarray(a))


def png_2048() -> bytes:
    y, x = np.mgrid[0:2048, 0:2048]
    return _png(Image.fromarray(((x // 64 + y // 64) % 2 * 255).astype(np.uint8)).convert("RGB"))


def _run(services: Services, posts: list[list[str]], warmup: str) -> dict[str, int]:
    cfg = {
        "endpoint": services.s3.endpoint,
        "bucket": BUCKET,
        "posts": posts,
        "warmup": warmup,
        "target": TARGET_PIXELS,
        "budget": BUDGET,
    }
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    growth = res["peak"] - res["before"]
    refs = sum(len(p) for p in posts)
    print(
        f"\n{len(posts)} posts × {len(posts[0])} refs: peak RSS growth {growth >> 20} MiB, "
        f"budget peak {res['budget_peak'] >> 20} MiB, {res['ok']} posts decoded"
    )
    res["growth"] = growth
    res["bound"] = BUDGET + refs * TARGET_PIXELS * 4 + SLACK
    return res


@pytest.fixture(scope="module")
def objects(services: Services) -> dict[str, object]:
    s3 = services.s3_client()
    prefix = uuid.uuid4().hex
    big16, sq = png16_39mp(), png_2048()
    assert len(big16) < 100_000 and len(sq) < 20_000  # the tiny-file, huge-image shapes
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/16bit.png", Body=big16)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/2048.png", Body=sq)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/warm.png", Body=_png(Image.new("RGB", (8, 8))))
    distinct = [f"{prefix}/16bit-{i}.png" for i in range(8)]
    for k in distinct:
        s3.put_object(Bucket=BUCKET, Key=k, Body=big16)
    return {"prefix": prefix, "distinct": distinct}


@pytest.mark.integration
def test_16bit_39mp_png_16x4_refs(services: Services, objects: dict[str, object]) -> None:
    key = f"{objects['prefix']}/16bit.png"
    res = _run(services, [[key] * 4 for _ in range(16)], f"{objects['prefix']}/warm.png")
    assert res["ok"] == 16
    assert res["growth"] < 200 << 20  # one decode of 79 MB of 16-bit pixels, shared by 64 refs


@pytest.mark.integration
def test_2048_png_64x4_refs(services: Services, objects: dict[str, object]) -> None:
    key = f"{objects['prefix']}/2048.png"
    res = _run(services, [[key] * 4 for _ in range(64)], f"{objects['prefix']}/warm.png")
    assert res["ok"] == 64
    assert res["growth"] < 100 << 20


@pytest.mark.integration
def test_distinct_39mp_pngs_stay_within_the_decode_budget(
    services: Services, objects: dict[str, object]
) -> None:
    distinct = objects["distinct"]
    assert isinstance(distinct, list)
    res = _run(services, [distinct[:4], distinct[4:]], f"{objects['prefix']}/warm.png")
    assert res["ok"] == 2
    assert res["budget_peak"] <= BUDGET
    assert res["growth"] < res["bound"], f"{res['growth'] >> 20} MiB >= bound {res['bound'] >> 20} MiB"


# ------------------------------------------------------------------ the worker path

WINDOW_POSTS = 64
WINDOW_TARGET = 724 * 724  # 2 MiB per RGB thumbnail: 64 posts × 4 refs = 512 MiB if all are held
WINDOW_BUDGET = 64 << 20
WINDOW_DECODE_BUDGET = 64 << 20


@pytest.mark.integration
def test_the_worker_window_holds_at_most_the_image_budget(
    services: Services, kafka_settings: Settings
) -> None:
    small = {"vllm_max_pixels": WINDOW_TARGET, "decode_budget_bytes": WINDOW_DECODE_BUDGET}
    s3 = services.s3_client()
    on = worker_image_run(kafka_settings, s3, WINDOW_POSTS, WINDOW_BUDGET, settings=small)
    off = worker_image_run(kafka_settings, s3, WINDOW_POSTS, UNBOUNDED, settings=small)
    bound = WINDOW_BUDGET + WINDOW_DECODE_BUDGET + SLACK
    print(
        f"\nworker window, {WINDOW_POSTS} posts × 4 distinct refs to a 2048² PNG, MAX_IN_FLIGHT 256: "
        f"peak RSS growth {on['growth'] >> 20} MiB with a {WINDOW_BUDGET >> 20} MiB image budget "
        f"(budget peak {on['budget_peak'] >> 20} MiB, at most {on['max_outstanding']} posts in the "
        f"engine), {off['growth'] >> 20} MiB without (all {off['max_outstanding']} in the engine); "
        f"bound {bound >> 20} MiB"
    )
    for res in (on, off):
        assert res["verdicts"] == res["consumed"] == WINDOW_POSTS
        assert res["budget_used_after"] == 0, "image bytes leaked past the run"
    assert on["budget_peak"] <= WINDOW_BUDGET
    assert on["max_outstanding"] < WINDOW_POSTS  # admission waited for the budget
    assert off["max_outstanding"] == WINDOW_POSTS  # the engine really held the whole feed at once
    assert on["growth"] < bound, f"{on['growth'] >> 20} MiB >= bound {bound >> 20} MiB"
    assert off["growth"] > bound, "without the budget the window should hold every thumbnail"
    assert off["growth"] - on["growth"] > 150 << 20
