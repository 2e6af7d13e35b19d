"""Replay for audits on the real broker: re-moderate a time window with a changed policy and compare."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from guard.engines.cpu.engine import CpuEngine, CpuEngineConfig
from guard.prompts import PromptSet
from guard.samples import TEXTS
from schemas.events import AuditRecord
from tests.conftest import Services
from workers.audit.replay import Replayer, export_decisions, parse_bound, render_markdown
from workers.demo.sample_feed import post
from workers.kafka.topics import read_records
from workers.settings import Settings
from workers.wiring import build_moderator, build_worker

pytestmark = pytest.mark.integration
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def committed(s: Settings) -> list[int]:
    c = Consumer({"bootstrap.servers": s.bootstrap_servers, "group.id": s.group_id})
    try:
        return [
            tp.offset for tp in c.committed([TopicPartition(s.posts_topic, p) for p in range(3)], timeout=10)
        ]
    finally:
        c.close()


def test_replay_window_with_changed_policy(
    kafka_settings: Settings, services: Services, cpu_engine: CpuEngine, prompts: PromptSet, tmp_path: Path
) -> None:
    labels = [lbl for lbl, _ in TEXTS]  # 3 safe, 5 unsafe
    texts = [t for _, t in TEXTS] + ["Sunday brunch with my parents", "New paint on the garden fence"]
    labels += ["safe", "safe"]
    p = Producer({"bootstrap.servers": kafka_settings.bootstrap_servers})
    for i, t in enumerate(texts):
        at = T0 + timedelta(minutes=i)
        p.produce(
            kafka_settings.posts_topic,
            post(f"r{i}", f"author-{i % 2}", t, at=at),
            f"r{i}".encode(),
            timestamp=int(at.timestamp() * 1000),
        )
    assert p.flush(10) == 0
    build_worker(kafka_settings, cpu_engine).run(until_drained=True)
    live_offsets = committed(kafka_settings)
    assert sum(live_offsets) == len(texts)

    # today's policy: flag everything (threshold 0) — a deliberately different operating point
    strict = CpuEngine(prompts, CpuEngineConfig(threshold=0.0), embedder=cpu_engine._emb)
    moderator = build_moderator(kafka_settings.model_copy(update={"cache_enabled": False}), strict)
    audit_topic = kafka_settings.posts_topic + "-audit"
    rp = Replayer(
        moderator,
        kafka_settings.bootstrap_servers,
        verdicts_topic=kafka_settings.verdicts_topic,
        dlq_topic=kafka_settings.dlq_topic,
        audit_topic=audit_topic,
        batch_size=4,
    )
    start, end = parse_bound((T0 + timedelta(minutes=2)).isoformat()), parse_bound("2026-03-01T12:07:00Z")
    report = rp.run("audit-1", kafka_settings.posts_topic, start, end)

    window = range(2, 8)
    expected_flips = sum(1 for i in window if labels[i] == "safe")
    assert (report.total, report.written, report.skipped_done, report.missing_original) == (6, 6, 0, 0)
    assert report.changed == expected_flips == 1
    assert dict(report.change_kinds) == {"safe_to_unsafe": expected_flips}
    assert (
        sum(report.flips.values()) == 6
        and report.flips[("safe", next(iter(b for (a, b) in report.flips if a == "safe")))] == expected_flips
    )

    recs = [
        AuditRecord.model_validate_json(r.value or b"")
        for r in read_records(kafka_settings.bootstrap_servers, audit_topic)
    ]
    assert sorted(r.post_id or "" for r in recs) == [f"r{i}" for i in window]
    for r in recs:
        assert r.original is not None and r.original.model_version == cpu_engine.model_version
        assert r.replayed.model_version == strict.model_version != r.original.model_version
        assert r.replayed.safe is False
        assert T0 + timedelta(minutes=2) <= datetime.fromtimestamp((r.source_timestamp_ms or 0) / 1000, UTC)
    assert committed(kafka_settings) == live_offsets, "replay moved the live group's offsets"

    md = render_markdown(
        report,
        topic=kafka_settings.posts_topic,
        engine=strict.name,
        model=strict.model_version,
        policy=strict.policy_version,
    )
    assert "| posts in range | 6 |" in md and "| safe_to_unsafe | 1 |" in md and "Flip matrix" in md

    again = rp.run("audit-1", kafka_settings.posts_topic, start, end)  # same id: nothing new
    assert (again.total, again.skipped_done, again.written) == (6, 6, 0)
    assert len(read_records(kafka_settings.bootstrap_servers, audit_topic)) == 6

    part, off = recs[0].source_partition, recs[0].source_offset
    one = rp.run("audit-2", kafka_settings.posts_topic, off, off, partitions=[part])  # offset bounds
    assert (one.total, one.written) == (1, 1)

    out = tmp_path / "export.jsonl"
    n = export_decisions(
        kafka_settings.bootstrap_servers, kafka_settings.verdicts_topic, out, author="author-1"
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == len(rows) == 5 and {r["author_id"] for r in rows} == {"author-1"}
    assert all(r["model_version"] == cpu_engine.model_version and r["policy_version"] for r in rows)
    later = export_decisions(
        kafka_settings.bootstrap_servers,
        kafka_settings.verdicts_topic,
        out,
        start=datetime.now(UTC) + timedelta(hours=1),
    )
    assert later == 0


def test_parse_bound() -> None:
    assert parse_bound("42") == 42 and parse_bound(None) is None
    assert parse_bound("2026-03-01T12:00:00") == T0 == parse_bound("2026-03-01T12:00:00Z")
    with pytest.raises(ValueError):
        parse_bound("last tuesday")
