"""The streaming worker on the real broker (Tansu), S3 server (moto) and Redis, with
``workers.testing.FakeStreamingEngine`` on the per-request seam (``StreamingEngine``): out-of-order
completion and the commit watermark, a revoke while requests are in flight, kill -9 with hundreds of
requests in flight, dead and hanging engines, S3 outages (a flaky fetcher through ``build_worker``'s
``fetcher``) and dead letters that must fit. Counts are printed. The ``Moderator``'s own poison and
dead-letter handling is in ``tests/unit/test_moderator.py``."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from PIL import Image

from infra.stack import create_topics, free_port
from schemas.events import ErrorCode, ImageRef
from tests.conftest import BUCKET, Services
from tests.support import revoke_with_requests_in_flight, run_in_thread, subprocess_env
from workers.demo.sample_feed import post
from workers.kafka.topics import produce_all, read_records, read_topic
from workers.kafka.worker import EngineUnavailable, MediaOutage
from workers.media import FetchedImage, ImageFetcher, MediaError, MediaUnavailable
from workers.observability.sensors import RecordingSensor
from workers.settings import Settings
from workers.testing import FakeStreamingEngine
from workers.wiring import build_fetcher, build_worker

# ------------------------------------------------------------------ helpers


def one_partition(settings: Settings, **kw: Any) -> Settings:
    sfx = uuid.uuid4().hex[:6]
    s = settings.model_copy(update={"posts_topic": f"posts1-{sfx}", "cache_enabled": False, **kw})
    create_topics(s.bootstrap_servers, {s.posts_topic: 1})
    return s


def committed(s: Settings) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": s.bootstrap_servers, "group.id": s.group_id})
    try:
        parts = c.list_topics(s.posts_topic, timeout=10).topics[s.posts_topic].partitions
        res = c.committed([TopicPartition(s.posts_topic, p) for p in parts], timeout=10)
        return {tp.partition: tp.offset for tp in res}
    finally:
        c.close()


def outputs(s: Settings) -> list[dict[str, Any]]:
    vals = read_topic(s.bootstrap_servers, s.verdicts_topic) + read_topic(s.bootstrap_servers, s.dlq_topic)
    return [json.loads(v) for v in vals]


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling an external condition (the broker), not standing in for a signal


def feed(s: Settings, n: int, tag: str, keyed: bool = True) -> list[str]:
    ids = [f"{tag}{i}" for i in range(n)]
    produce_all(
        s.bootstrap_servers,
        s.posts_topic,
        [
            (pid if keyed else None, post(pid, f"a{i % 7}", f"{tag} post {i} about the weekend"))
            for i, pid in enumerate(ids)
        ],
    )
    return ids


# ------------------------------------------------------------------ ordering and the watermark


@pytest.mark.integration
def test_out_of_order_completion_commits_only_up_to_the_first_incomplete_post(
    kafka_settings: Settings,
) -> None:
    s = one_partition(kafka_settings, commit_interval_ms=50)
    ids = feed(s, 30, "ooo", keyed=False)
    held = "ooo5"
    # later posts answer sooner (reverse order); post 5 is held until released
    engine = FakeStreamingEngine(latency=lambda pid: (30 - int(pid[3:])) * 0.01, hold=lambda pid: pid == held)
    worker = build_worker(s, engine)
    errors: list[BaseException] = []
    t = run_in_thread(worker, errors, until_drained=True)
    try:
        wait_for(
            lambda: len(read_topic(s.bootstrap_servers, s.verdicts_topic, timeout_s=2)) == 29,
            60,
            "29 verdicts",
        )
        wait_for(lambda: committed(s).get(0) == 5, 30, "the commit at the held post")
        published = [json.loads(v) for v in read_topic(s.bootstrap_servers, s.verdicts_topic)]
        order = [v["source_offset"] for v in published]
        assert order != sorted(order), "completions were published in offset order"
        assert held not in {v["post_id"] for v in published}
        assert committed(s)[0] == 5  # never past the incomplete post, though 24 posts above it are done
    finally:
        engine.release.set()
    t.join(60)
    assert not t.is_alive() and not errors, errors
    counts = Counter(v["post_id"] for v in outputs(s))
    print(
        f"out-of-order: posts={len(ids)} order={order[:8]}... committed_while_held=5 final={committed(s)[0]}"
    )
    assert set(counts) == set(ids) and max(counts.values()) == 1
    assert committed(s)[0] == 30


@pytest.mark.integration
def test_cache_hits_and_dead_letters_do_not_wait_behind_the_engine(kafka_settings: Settings) -> None:
    s = one_partition(kafka_settings, commit_interval_ms=50)
    produce_all(
        s.bootstrap_servers,
        s.posts_topic,
        [(None, post("slow0", "a", "a slow post")), (None, b"not json"), (None, post("x1", "a", "x"))],
    )
    engine = FakeStreamingEngine(hold=lambda pid: pid == "slow0")
    errors: list[BaseException] = []
    t = run_in_thread(build_worker(s, engine), errors, until_drained=True)
    try:
        wait_for(
            lambda: len(read_topic(s.bootstrap_servers, s.dlq_topic, timeout_s=2)) == 1, 60, "the dead letter"
        )
        wait_for(lambda: len(read_topic(s.bootstrap_servers, s.verdicts_topic, timeout_s=2)) == 1, 60, "x1")
        assert committed(s).get(0, -1) <= 0  # published, but nothing committed past the held post
    finally:
        engine.release.set()
    t.join(60)
    assert not errors, errors
    assert committed(s)[0] == 3


# ------------------------------------------------------------------ rebalance


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_revoke_while_requests_are_in_flight_drops_them_uncommitted(
    kafka_settings: Settings, mode: str
) -> None:
    s = kafka_settings.model_copy(
        update={"revoke_timeout_s": 0.5, "cache_enabled": False, "commit_interval_ms": 100, "delivery": mode}
    )
    ids = feed(s, 90, "rv")
    r = revoke_with_requests_in_flight(
        s.model_copy(update={"transactional_id": f"{s.group_id}-1"}),
        s.model_copy(update={"transactional_id": f"{s.group_id}-2"}),
        enter_at=30,
    )
    counts = Counter(v["post_id"] for v in outputs(s))
    lost, duplicated = set(ids) - set(counts), sum(c - 1 for c in counts.values())
    print(
        f"revoke-in-flight[{mode}]: posts={len(ids)} dropped_at_revoke={r.dropped} "
        f"first={r.first.stats.consumed} second={r.second.stats.consumed} "
        f"lost={len(lost)} duplicated={duplicated}"
    )
    assert r.dropped > 0, "the revoke did not drop the requests still in the engine"
    assert not lost and duplicated == 0
    assert r.second.stats.consumed > 0


# ------------------------------------------------------------------ kill -9 with requests in flight


def _latency(pid: str) -> float:
    """0.2 .. 3 s, from the post id: completions far out of order."""
    return 0.2 + (hashlib.sha256(pid.encode()).digest()[0] / 255.0) * 2.8


def slow_worker_main() -> None:
    """Entry point of the subprocess killed by the crash test: the real worker, a slow fake engine."""
    from workers.observability.metrics import start_metrics_server

    s = Settings()
    if s.metrics_port:
        start_metrics_server(s.metrics_port, "127.0.0.1")
    w = build_worker(s, FakeStreamingEngine(latency=_latency, max_in_flight=400))
    w.install_signal_handlers()
    w.run()


@pytest.mark.integration
def test_kill_9_with_hundreds_in_flight_loses_nothing(kafka_settings: Settings, tmp_path: Path) -> None:
    n = 1200
    ids = feed(kafka_settings, n, "k")
    port = free_port()
    env = subprocess_env(
        kafka_settings,
        GUARDSTREAM_CACHE_ENABLED="false",
        GUARDSTREAM_COMMIT_INTERVAL_MS="200",
        GUARDSTREAM_METRICS_PORT=str(port),
        GUARDSTREAM_LOG_FORMAT="json",
    )
    log_path = tmp_path / "worker.log"
    in_flight_at_kill = 0.0
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from tests.integration.test_streaming_worker import slow_worker_main; slow_worker_main()",
            ],
            env=env,
            stdout=log_file,
            stderr=log_file,
        )
        try:

            def loaded() -> bool:
                nonlocal in_flight_at_kill
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                except httpx.HTTPError:
                    return False
                lines = text.splitlines()
                flight = [ln for ln in lines if ln.startswith("guardstream_in_flight ")]
                done = sum(
                    float(ln.split()[1]) for ln in lines if ln.startswith("guardstream_moderated_total{")
                )
                in_flight_at_kill = float(flight[0].split()[1]) if flight else 0.0
                if done < 300 or in_flight_at_kill < 200:
                    return False
                # the watermark has moved: some records are below it (published once) and many above
                return sum(max(o, 0) for o in committed(kafka_settings).values()) >= 100

            wait_for(loaded, 120, "200+ requests in flight and a watermark past 100 records")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    watermark = committed(kafka_settings)
    before = outputs(kafka_settings)
    # a clean run finishes the feed
    build_worker(kafka_settings.model_copy(update={"cache_enabled": False}), FakeStreamingEngine()).run(
        until_drained=True
    )
    outs = outputs(kafka_settings)
    by_post: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for o in outs:
        by_post[o["post_id"]].append(o)
    lost = set(ids) - set(by_post)
    dups = {pid: c for pid, c in by_post.items() if len(c) > 1}
    print(
        f"kill-9-in-flight: posts={n} in_flight_at_kill={in_flight_at_kill:.0f} "
        f"published_before_kill={len(before)} "
        f"watermark={watermark} lost={len(lost)} duplicated={sum(len(c) - 1 for c in dups.values())}"
    )
    assert not lost, sorted(lost)[:10]
    for pid, copies in dups.items():
        # only records at or above the committed watermark may be published twice, with the same decision
        assert all(c["source_offset"] >= watermark[c["source_partition"]] for c in copies), (pid, watermark)
        assert len({c["safe"] for c in copies}) == 1, pid
    # and below the watermark every record was published before the kill
    below = {o["post_id"] for o in before if o["source_offset"] < watermark[o["source_partition"]]}
    committed_records = [
        r
        for r in read_records(kafka_settings.bootstrap_servers, kafka_settings.posts_topic)
        if r.offset < watermark[r.partition]
    ]
    assert len(below) == len(committed_records)


# ------------------------------------------------------------------ outages and poison


@pytest.mark.integration
def test_dead_engine_is_an_outage_not_a_dead_letter(kafka_settings: Settings) -> None:
    s = kafka_settings.model_copy(
        update={"cache_enabled": False, "outage_backoff_s": 0.2, "engine_deadline_s": 60}
    )
    ids = feed(s, 20, "de")
    engine = FakeStreamingEngine()
    engine.dead.set()
    sensor = RecordingSensor()
    worker = build_worker(s, engine, sensor=sensor)
    errors: list[BaseException] = []
    t = run_in_thread(worker, errors, until_drained=True)
    wait_for(lambda: engine.started >= 40, 60, "the engine to be retried")  # 20 posts, each tried twice
    assert all(off <= 0 for off in committed(s).values())  # nothing past the first post
    # the outage is reported: /readyz 503 and guardstream_ready 0 with the reason, while it lasts
    assert worker.readiness() == (False, "engine unavailable")
    assert (False, "engine unavailable") in sensor.ready
    engine.dead.clear()  # the engine comes back: the held posts go through
    t.join(120)
    last_down = max(i for i, r in enumerate(sensor.ready) if r == (False, "engine unavailable"))
    assert (True, "ready") in sensor.ready[last_down:], sensor.ready[-5:]  # and ready again once it is back
    assert not errors, errors
    outs = outputs(s)
    print(f"dead-engine: posts={len(ids)} requests={engine.started} outputs={len(outs)}")
    assert sorted(o["post_id"] for o in outs) == sorted(ids)
    assert not [o for o in outs if o.get("error_code")], "a dead engine dead-lettered posts"


@pytest.mark.integration
def test_engine_dead_past_the_deadline_exits(kafka_settings: Settings) -> None:
    s = kafka_settings.model_copy(
        update={"cache_enabled": False, "outage_backoff_s": 0.2, "engine_deadline_s": 2}
    )
    feed(s, 5, "dd")
    engine = FakeStreamingEngine()
    engine.dead.set()
    with pytest.raises(EngineUnavailable, match="ENGINE_DEADLINE_S"):
        build_worker(s, engine).run(idle_timeout_s=60)
    assert not outputs(s)
    assert all(off <= 0 for off in committed(s).values())


@pytest.mark.integration
def test_a_hanging_request_times_out_and_only_it_is_dead_lettered(kafka_settings: Settings) -> None:
    s = kafka_settings.model_copy(update={"cache_enabled": False, "engine_timeout_s": 0.5})
    ids = feed(s, 12, "hg")
    engine = FakeStreamingEngine(hang=lambda pid: pid == "hg3")
    build_worker(s, engine).run(until_drained=True)
    outs = {o["post_id"]: o for o in outputs(s)}
    assert set(outs) == set(ids)
    assert outs["hg3"]["error_code"] == ErrorCode.ENGINE_TIMEOUT.value
    assert all("error_code" not in o for pid, o in outs.items() if pid != "hg3")


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


class FlakyFetcher:
    """The real fetcher, after S3 was unavailable for the first ``fail`` calls (``fail < 0``: forever)."""

    def __init__(self, real: ImageFetcher, fail: int) -> None:
        self.real, self.fail, self.calls = real, fail, 0

    def fetch_posts(
        self, refs_per_post: Sequence[Sequence[ImageRef]]
    ) -> list[list[FetchedImage] | MediaError]:
        self.calls += 1
        if self.fail < 0 or self.calls <= self.fail:
            raise MediaUnavailable("S3 503 SlowDown after 4 attempts")
        return self.real.fetch_posts(refs_per_post)

    def close(self) -> None:
        self.real.close()


@pytest.mark.integration
def test_s3_outage_holds_image_posts_and_they_go_through_when_it_is_back(
    kafka_settings: Settings, services: Services
) -> None:
    s = kafka_settings.model_copy(update={"cache_enabled": False, "outage_backoff_s": 0.2})
    services.s3_client().put_object(Bucket=BUCKET, Key="stream/red.png", Body=png())
    posts = [
        (f"im{i}", post(f"im{i}", "a", f"caption {i}", [f"s3://{BUCKET}/stream/red.png"])) for i in range(6)
    ]
    posts += [(f"tx{i}", post(f"tx{i}", "a", f"text {i}")) for i in range(6)]
    produce_all(s.bootstrap_servers, s.posts_topic, posts)
    flaky = FlakyFetcher(build_fetcher(s), fail=3)
    sensor = RecordingSensor()
    build_worker(s, FakeStreamingEngine(), fetcher=flaky, sensor=sensor).run(until_drained=True)
    assert (False, "media (S3) unavailable") in sensor.ready  # reported on /readyz while it lasted
    outs = outputs(s)
    print(f"s3-outage: posts={len(posts)} fetch_calls={flaky.calls} outputs={len(outs)}")
    assert flaky.calls > 3
    assert sorted(o["post_id"] for o in outs) == sorted(pid for pid, _ in posts)
    assert not [o for o in outs if o.get("error_code")], "an S3 outage dead-lettered posts"


@pytest.mark.integration
def test_s3_outage_past_the_deadline_exits_and_commits_nothing_past_it(
    kafka_settings: Settings, services: Services
) -> None:
    s = one_partition(kafka_settings, outage_backoff_s=0.2, media_deadline_s=2)
    produce_all(
        s.bootstrap_servers,
        s.posts_topic,
        [(None, post("t0", "a", "text first")), (None, post("i1", "a", "img", [f"s3://{BUCKET}/x.png"]))]
        + [(None, post(f"t{i}", "a", f"text {i}")) for i in range(2, 6)],
    )
    worker = build_worker(s, FakeStreamingEngine(), fetcher=FlakyFetcher(build_fetcher(s), fail=-1))
    with pytest.raises(MediaOutage, match="MEDIA_DEADLINE_S"):
        worker.run(idle_timeout_s=60)
    assert committed(s)[0] <= 1  # never past the held image post
    assert "i1" not in {o["post_id"] for o in outputs(s)}


@pytest.mark.integration
def test_an_output_over_the_message_size_is_re_sent_trimmed(kafka_settings: Settings) -> None:
    s = one_partition(
        kafka_settings, dlq_max_original_bytes=512 * 1024, kafka_extra={"message.max.bytes": "300000"}
    )
    raw = b'{"post_id": "huge", "text": "' + b"x" * 250_000  # broken JSON: a dead letter of ~330 KB
    produce_all(s.bootstrap_servers, s.posts_topic, [(None, raw), (None, post("after", "a", "next post"))])
    build_worker(s, FakeStreamingEngine()).run(until_drained=True)
    (dl,) = [json.loads(v) for v in read_topic(s.bootstrap_servers, s.dlq_topic)]
    assert dl["original_value_size"] == len(raw)
    assert dl["original_value_sha256"] == hashlib.sha256(raw).hexdigest()
    assert dl["original_value_truncated"] is True
    assert len(base64.b64decode(dl["original_value_b64"])) < len(raw)
    assert [json.loads(v)["post_id"] for v in read_topic(s.bootstrap_servers, s.verdicts_topic)] == ["after"]
    assert committed(s)[0] == 2


@pytest.mark.integration
def test_stop_with_a_hung_engine_returns_within_the_shutdown_timeout(kafka_settings: Settings) -> None:
    """SIGTERM (``stop``) while every request hangs: the worker waits SHUTDOWN_TIMEOUT_S, commits nothing
    past the unanswered posts, and returns (they are re-delivered to the next worker)."""
    s = one_partition(kafka_settings, shutdown_timeout_s=1.0)
    produce_all(s.bootstrap_servers, s.posts_topic, [(None, post(f"h{i}", "a", f"t {i}")) for i in range(5)])
    engine = FakeStreamingEngine(hang=lambda _pid: True)
    engine.enter_at = 5
    worker = build_worker(s, engine)
    errors: list[BaseException] = []
    t = run_in_thread(worker, errors)
    assert engine.entered.wait(60), "the posts never reached the engine"
    stopped = time.monotonic()
    worker.stop()
    t.join(30)
    took = time.monotonic() - stopped
    print(f"stop-with-hung-engine: returned after {took:.1f}s (shutdown timeout 1s)")
    assert not t.is_alive() and not errors, errors
    assert took < 15
    assert committed(s)[0] <= 0 and not outputs(s)
