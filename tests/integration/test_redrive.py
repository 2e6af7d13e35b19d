"""``guardstream redrive`` on the real broker, S3 server and Redis (issue 13, item 3).

A post whose image was missing is dead-lettered (``image_not_found``); the object is restored; a dry
run counts it and writes nothing; a redrive sends it back with provenance headers; the worker then
publishes a verdict for it; a second redrive is a no-op (idempotent); other codes are left alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from guard.engines.cpu.engine import CpuEngine
from guard.samples import drawn_image, png_bytes
from tests.conftest import BUCKET, Services
from tests.support import subprocess_env
from workers.demo.sample_feed import post
from workers.kafka.topics import produce_all, read_records, read_topic
from workers.redrive import HEADER_OF, HEADER_SOURCE, ledger_topic, redrive
from workers.settings import Settings
from workers.wiring import build_worker

pytestmark = pytest.mark.integration


def _headers_of_posts(settings: Settings, count: int) -> list[dict[str, str]]:
    """The headers of every posts-topic record that has any (read by assignment, ``count`` records)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "headers-reader"})
    try:
        parts = c.list_topics(settings.posts_topic, timeout=10).topics[settings.posts_topic].partitions
        c.assign([TopicPartition(settings.posts_topic, p, 0) for p in parts])
        out: list[dict[str, str]] = []
        seen = 0
        for _ in range(30):
            for m in c.consume(100, 1.0):
                if not m.error():
                    seen += 1
                    if m.headers():
                        out.append({k: (v or b"").decode() for k, v in m.headers() or []})
            if seen >= count:
                break
        return out
    finally:
        c.close()


def test_redrive_after_the_object_is_restored(
    kafka_settings: Settings, services: Services, cpu_engine: CpuEngine
) -> None:
    s3 = services.s3_client()
    key = f"{uuid.uuid4().hex}/later.png"
    feed = [
        (b"late", post("late", "a", "look", images=[f"s3://{BUCKET}/{key}"])),
        (b"text", post("text", "a", "Anyone know a good pizza place downtown?")),
        (b"junk", b"{not json"),
    ]
    produce_all(kafka_settings.bootstrap_servers, kafka_settings.posts_topic, feed)
    build_worker(kafka_settings, cpu_engine).run(until_drained=True)
    dlq = [json.loads(v) for v in read_topic(kafka_settings.bootstrap_servers, kafka_settings.dlq_topic)]
    assert sorted(d["error_code"] for d in dlq) == ["image_not_found", "invalid_json"]

    s3.put_object(Bucket=BUCKET, Key=key, Body=png_bytes(drawn_image(8)))  # restored
    codes = {"image_not_found"}
    dry = redrive(
        kafka_settings.bootstrap_servers,
        dlq_topic=kafka_settings.dlq_topic,
        posts_topic=kafka_settings.posts_topic,
        codes=codes,
        dry_run=True,
    )
    assert (dry.matched, dry.redriven, dict(dry.by_code)) == (1, 0, {"image_not_found": 1})
    assert (
        len(read_topic(kafka_settings.bootstrap_servers, kafka_settings.posts_topic)) == 3
    )  # nothing written

    rep = redrive(
        kafka_settings.bootstrap_servers,
        dlq_topic=kafka_settings.dlq_topic,
        posts_topic=kafka_settings.posts_topic,
        codes=codes,
    )
    assert (rep.matched, rep.redriven, rep.already) == (1, 1, 0)
    again = redrive(
        kafka_settings.bootstrap_servers,
        dlq_topic=kafka_settings.dlq_topic,
        posts_topic=kafka_settings.posts_topic,
        codes=codes,
    )
    assert (again.matched, again.redriven, again.already) == (1, 0, 1)  # idempotent
    assert len(read_records(kafka_settings.bootstrap_servers, ledger_topic(kafka_settings.dlq_topic))) == 1

    posts = read_records(kafka_settings.bootstrap_servers, kafka_settings.posts_topic)
    assert len(posts) == 4 and sum(r.key == b"late" for r in posts) == 2
    (hdrs,) = _headers_of_posts(kafka_settings, 4)
    assert hdrs[HEADER_OF].startswith(f"{kafka_settings.dlq_topic}:") and hdrs[HEADER_SOURCE].startswith(
        f"{kafka_settings.posts_topic}:"
    )

    build_worker(kafka_settings, cpu_engine).run(until_drained=True)
    verdicts = [
        json.loads(v) for v in read_topic(kafka_settings.bootstrap_servers, kafka_settings.verdicts_topic)
    ]
    assert sorted(v["post_id"] for v in verdicts) == ["late", "text"]


def test_redrive_cli_dry_run_and_unknown_codes(kafka_settings: Settings) -> None:
    env = subprocess_env(kafka_settings)
    cmd = [sys.executable, "-m", "workers.cli", "redrive"]
    bad = subprocess.run(
        [*cmd, "--code", "no_such_code"], env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0 and "unknown error code" in bad.stderr
    ok = subprocess.run(
        [*cmd, "--code", "s3_unavailable", "--dry-run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "would redrive 0" in ok.stdout
