"""End to end on the real broker (Tansu), S3 server (moto) and Redis: posts → worker → topics → commits."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from guard.engines.cpu.engine import CpuEngine
from tests.conftest import Services
from tests.support import subprocess_env
from workers.demo.sample_feed import build_feed, post
from workers.kafka.topics import end_offsets as topic_end_offsets
from workers.kafka.topics import produce_all, read_records, read_topic
from workers.kafka.worker import PublishError
from workers.settings import Settings
from workers.wiring import build_worker

pytestmark = pytest.mark.integration


def seed_feed(settings: Settings, services: Services) -> list[Any]:
    feed, objects = build_feed(settings.allowed_buckets[0])
    s3 = services.s3_client()
    for k, data in objects.items():
        s3.put_object(Bucket=settings.allowed_buckets[0], Key=k, Body=data)
    produce_all(settings.bootstrap_servers, settings.posts_topic, [(p.key, p.value) for p in feed])
    return feed


def committed(settings: Settings, group: str | None = None) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": group or settings.group_id})
    try:
        parts = c.list_topics(settings.posts_topic, timeout=10).topics[settings.posts_topic].partitions
        res = c.committed([TopicPartition(settings.posts_topic, p) for p in parts], timeout=10)
        return {tp.partition: tp.offset for tp in res}
    finally:
        c.close()


def end_offsets(settings: Settings) -> dict[int, int]:
    parts = (
        Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "x"})
        .list_topics(settings.posts_topic, timeout=10)
        .topics[settings.posts_topic]
        .partitions
    )
    ends = topic_end_offsets(settings.bootstrap_servers, settings.posts_topic)
    return {p: ends.get(p, -1001) for p in parts}


def outputs(settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    v = [json.loads(x) for x in read_topic(settings.bootstrap_servers, settings.verdicts_topic)]
    d = [json.loads(x) for x in read_topic(settings.bootstrap_servers, settings.dlq_topic)]
    n = [json.loads(x) for x in read_topic(settings.bootstrap_servers, settings.novel_risk_topic)]
    return v, d, n


def test_feed_end_to_end_then_cache_hits(
    kafka_settings: Settings, services: Services, cpu_engine: CpuEngine
) -> None:
    feed = seed_feed(kafka_settings, services)
    stats = build_worker(kafka_settings, cpu_engine).run(until_drained=True)
    assert stats.consumed == len(feed)

    verdicts, dlq, novel = outputs(kafka_settings)
    # exactly one verdict or one dead letter per post
    by_id = Counter(
        [v["post_id"] for v in verdicts] + [d["post_id"] or f"offset-{d['source_offset']}" for d in dlq]
    )
    assert sum(by_id.values()) == len(feed) and max(by_id.values()) == 1
    expected = {p.key: p.expect for p in feed}
    assert {v["post_id"] for v in verdicts} == {k for k, e in expected.items() if e == "verdict"}
    got_codes = {(d["post_id"] or "demo-bad-json"): d["error_code"] for d in dlq}
    assert got_codes == {k: e for k, e in expected.items() if e != "verdict"}
    for d in dlq:  # the dead letter carries the exact original bytes
        original = next(p.value for p in feed if p.key == (d["post_id"] or "demo-bad-json"))
        assert __import__("base64").b64decode(d["original_value_b64"]) == original
    unsafe_text = {v["post_id"] for v in verdicts if v["safe"] is False and v["modality"] == "text"}
    assert unsafe_text == {f"demo-text-{i}" for i in range(3, 8)}
    assert all(v["safe"] is None for v in verdicts if v["modality"] == "image")
    assert {n["post_id"] for n in novel} == {
        v["post_id"] for v in verdicts if v["novel_risk"] or (v["safe"] is False and not v["category"])
    }
    assert all(not v["cache_hit"] for v in verdicts)
    # offsets were committed to the end, and only after publishing
    assert committed(kafka_settings) == end_offsets(kafka_settings)

    # a second group over the same content: every verdict is a cache hit, with identical decisions
    s2 = kafka_settings.model_copy(
        update={
            "group_id": kafka_settings.group_id + "-again",
            "verdicts_topic": kafka_settings.verdicts_topic,
        }
    )
    before = {v["post_id"]: (v["safe"], v["subcategory"]) for v in verdicts}
    build_worker(s2, cpu_engine).run(until_drained=True)
    recs = sorted(
        read_records(kafka_settings.bootstrap_servers, kafka_settings.verdicts_topic),
        key=lambda r: (r.partition, r.offset),
    )
    seen: set[str] = set()
    second = []
    for r in recs:  # keyed by post_id, so a post's two verdicts share a partition, in order
        v = json.loads(r.value or b"{}")
        if v["post_id"] in seen:
            second.append(v)
        seen.add(v["post_id"])
    assert len(recs) == 2 * len(verdicts) and len(second) == len(verdicts)
    assert all(v["cache_hit"] for v in second)
    assert {v["post_id"]: (v["safe"], v["subcategory"]) for v in second} == before


def test_nothing_is_committed_when_publish_fails(
    kafka_settings: Settings, services: Services, cpu_engine: CpuEngine
) -> None:
    posts = [post(f"pf-{i}", "a", f"post {i}") for i in range(6)]
    produce_all(kafka_settings.bootstrap_servers, kafka_settings.posts_topic, [(None, v) for v in posts])
    broken = kafka_settings.model_copy(
        update={"verdicts_topic": "not a valid topic name!", "produce_timeout_s": 5}
    )
    with pytest.raises(PublishError):
        build_worker(broken, cpu_engine).run(until_drained=True)
    assert all(off < 0 for off in committed(kafka_settings).values()), (
        "offsets committed despite failed publish"
    )
    # the same group, fixed: every post is moderated, none lost
    build_worker(kafka_settings, cpu_engine).run(until_drained=True)
    verdicts, _, _ = outputs(kafka_settings)
    assert sorted(v["post_id"] for v in verdicts) == sorted(f"pf-{i}" for i in range(6))
    assert committed(kafka_settings) == end_offsets(kafka_settings)


def test_sigterm_drains_in_flight_work(kafka_settings: Settings, services: Services, tmp_path: Any) -> None:
    n = 300
    produce_all(
        kafka_settings.bootstrap_servers,
        kafka_settings.posts_topic,
        [(None, post(f"sig-{i}", f"a{i % 7}", f"message number {i} about my weekend")) for i in range(n)],
    )
    env = subprocess_env(
        kafka_settings,
        GUARDSTREAM_SESSION_TIMEOUT_MS="6000",
        GUARDSTREAM_MAX_BATCH_SIZE="4",
        GUARDSTREAM_CACHE_ENABLED="false",
        GUARDSTREAM_LOG_FORMAT="json",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "worker"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until the worker has published something
            if read_topic(kafka_settings.bootstrap_servers, kafka_settings.verdicts_topic, timeout_s=2):
                break
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()[-3000:]
    assert b"shutdown_requested" in out and b"worker_stopped" in out
    verdicts, _, _ = outputs(kafka_settings)
    published = Counter(v["post_id"] for v in verdicts)
    assert max(published.values()) == 1
    # everything below the committed offsets was published (nothing lost)...
    done = committed(kafka_settings)
    for v in verdicts:
        assert v["source_offset"] < done[v["source_partition"]]
    assert sum(max(o, 0) for o in done.values()) == len(verdicts)
    print(f"sigterm: {n} posts, {len(verdicts)} published and committed before shutdown")
    # ...and a restart finishes the rest without duplicates
    from workers.wiring import build_worker as bw

    bw(kafka_settings.model_copy(update={"cache_enabled": False})).run(until_drained=True)
    verdicts, _, _ = outputs(kafka_settings)
    final = Counter(v["post_id"] for v in verdicts)
    assert len(final) == n and max(final.values()) == 1
