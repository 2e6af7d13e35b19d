"""The worker's image budget (``GUARDSTREAM_INFLIGHT_IMAGE_BYTES``) on the real broker and S3 server: image
posts wait for room before the window (the partitions pause, as for a full window), a post larger than
the whole budget goes through alone, and the bytes come back exactly once on every path — verdict, dead
letter, a revoke of in-flight work, shutdown with requests still in the engine. Counts are printed."""

from __future__ import annotations

import io
import threading
import uuid
from collections import Counter

import pytest
from PIL import Image

from guard.types import ModerationItem, Verdict
from tests.conftest import BUCKET, Services
from tests.integration.test_streaming_worker import one_partition, outputs, wait_for
from tests.support import revoke_with_requests_in_flight, run_in_thread
from workers.demo.sample_feed import post
from workers.kafka.topics import produce_all
from workers.observability.sensors import RecordingSensor
from workers.settings import Settings
from workers.testing import FakeStreamingEngine
from workers.wiring import build_worker

MIB = 1 << 20


def solid_png(side: int, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, format="PNG")
    return buf.getvalue()


def upload(services: Services, n: int, side: int) -> list[str]:
    """``n`` distinct objects (no dedup) of a ``side``² image; returns their s3:// refs."""
    s3, prefix = services.s3_client(), uuid.uuid4().hex[:8]
    refs = []
    for i in range(n):
        key = f"budget/{prefix}/{i}.png"
        s3.put_object(Bucket=BUCKET, Key=key, Body=solid_png(side, (i % 256, 40, 90)))
        refs.append(f"s3://{BUCKET}/{key}")
    return refs


class CountingEngine(FakeStreamingEngine):
    """Also records how many image posts were in the engine at once."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.images_now = 0
        self.images_max = 0

    async def judge(self, item: ModerationItem) -> Verdict:
        if not item.images:
            return await super().judge(item)
        self.images_now += 1
        self.images_max = max(self.images_max, self.images_now)
        try:
            return await super().judge(item)
        finally:
            self.images_now -= 1


@pytest.mark.integration
def test_image_posts_wait_for_the_budget_and_the_partitions_pause(
    kafka_settings: Settings, services: Services
) -> None:
    # 1 MP thumbnails (4 MiB each, the 1024² images are not resized); 2 refs a post: 8 MiB worst case,
    # so a 16 MiB budget takes two image posts at a time
    s = one_partition(
        kafka_settings, vllm_max_pixels=1024 * 1024, inflight_image_bytes=16 * MIB, pause_after_s=0.1
    )
    refs = upload(services, 16, 1024)
    posts = []
    for i in range(8):
        posts.append((f"im{i}", post(f"im{i}", "a", f"caption {i}", refs[2 * i : 2 * i + 2])))
        posts.append((f"tx{i}", post(f"tx{i}", "a", f"text {i}")))
    produce_all(s.bootstrap_servers, s.posts_topic, posts)
    engine = CountingEngine(hold=lambda pid: pid.startswith("im"))
    paused = threading.Event()
    sensor = RecordingSensor()
    worker = build_worker(
        s, engine, sensor=sensor, on_event=lambda name, _d: paused.set() if name == "paused" else None
    )
    errors: list[BaseException] = []
    t = run_in_thread(worker, errors, until_drained=True)
    assert paused.wait(60), "the partitions were not paused while image posts waited for the budget"
    # the two admitted image posts are held by the engine: nothing can change until the release
    wait_for(lambda: engine.images_now == 2, 30, "two image posts in the engine")
    waiting, used, in_engine = worker.waiting_for_image_budget, worker.images.used, engine.images_now
    engine.release.set()
    t.join(120)
    assert not t.is_alive() and not errors, errors
    counts = Counter(o["post_id"] for o in outputs(s))
    print(
        f"image-budget: posts={len(posts)} waiting_at_pause={waiting} used_at_pause={used >> 20}MiB "
        f"image_posts_in_engine_max={engine.images_max} budget_peak={worker.images.peak >> 20}MiB "
        f"published={sum(counts.values())} used_after={worker.images.used}"
    )
    assert waiting > 0 and in_engine == 2 and used == 16 * MIB
    assert engine.images_max == 2
    assert worker.images.peak <= 16 * MIB
    assert counts == Counter(pid for pid, _ in posts), "lost or duplicated posts"
    assert not [o for o in outputs(s) if o.get("error_code")]
    assert worker.images.used == 0
    # what the dashboard shows (guardstream_image_budget_*): full while posts waited, empty at the end
    assert (16 * MIB, 16 * MIB) in {(used, cap) for used, cap, waiting in sensor.image_budget if waiting}
    assert sensor.image_budget[-1] == (0, 16 * MIB, 0)


@pytest.mark.integration
def test_a_post_larger_than_the_whole_budget_goes_through_alone(
    kafka_settings: Settings, services: Services
) -> None:
    # 2048² thumbnails are 16 MiB each: a 4-image post needs 64 MiB, four times the 16 MiB budget
    s = one_partition(kafka_settings, vllm_max_pixels=2048 * 2048, inflight_image_bytes=16 * MIB)
    refs = upload(services, 5, 2048)
    posts = [
        ("big", post("big", "a", "four huge images", refs[:4])),
        ("next", post("next", "a", "one more", refs[4:])),
        ("text", post("text", "a", "and some text")),
    ]
    produce_all(s.bootstrap_servers, s.posts_topic, posts)
    engine = CountingEngine(latency=lambda _pid: 0.05)
    worker = build_worker(s, engine)
    worker.run(until_drained=True)
    got = sorted(o["post_id"] for o in outputs(s))
    print(
        f"oversized post: published={got} budget_peak={worker.images.peak >> 20}MiB "
        f"image_posts_in_engine_max={engine.images_max}"
    )
    assert got == ["big", "next", "text"]
    assert not [o for o in outputs(s) if o.get("error_code")]
    assert worker.images.peak == 64 * MIB  # admitted alone, over the budget
    assert engine.images_max == 1
    assert worker.images.used == 0


@pytest.mark.integration
def test_a_revoke_and_a_shutdown_with_image_posts_in_flight_give_every_byte_back(
    kafka_settings: Settings, services: Services
) -> None:
    s = kafka_settings.model_copy(
        update={"revoke_timeout_s": 0.5, "cache_enabled": False, "shutdown_timeout_s": 0.5}
    )
    refs = upload(services, 60, 64)
    ids = [f"rv{i}" for i in range(60)]
    produce_all(
        s.bootstrap_servers,
        s.posts_topic,
        [(pid, post(pid, "a", f"caption {i}", [refs[i]])) for i, pid in enumerate(ids)],
    )
    r = revoke_with_requests_in_flight(s, s, enter_at=20, what="image posts")
    counts = Counter(o["post_id"] for o in outputs(s))
    print(
        f"revoke with images: held_before={r.images_held} B dropped={r.dropped} "
        f"first={r.first.stats.consumed} second={r.second.stats.consumed} "
        f"lost={len(set(ids) - set(counts))} "
        f"used_after first={r.first.images.used} second={r.second.images.used}"
    )
    assert r.images_held > 0 and r.dropped > 0
    assert set(counts) == set(ids)
    assert r.first.images.used == 0 and r.second.images.used == 0, "image bytes leaked across the revoke"

    # shutdown with requests that never finish: they are abandoned uncommitted, their bytes given back
    s2 = one_partition(kafka_settings, shutdown_timeout_s=0.2)
    produce_all(
        s2.bootstrap_servers,
        s2.posts_topic,
        [(f"h{i}", post(f"h{i}", "a", "caption", [refs[i]])) for i in range(5)],
    )
    hung = FakeStreamingEngine(hang=lambda _pid: True)
    hung.enter_at = 5
    w = build_worker(s2, hung)
    errors: list[BaseException] = []
    t3 = run_in_thread(w, errors)
    assert hung.entered.wait(60)
    assert w.images.used > 0  # settled before the requests were submitted
    w.stop()
    t3.join(60)
    assert not t3.is_alive() and not errors, errors
    assert w.images.used == 0, "image bytes leaked past shutdown"
