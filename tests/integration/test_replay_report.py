"""Replay reports on the real broker: cumulative per replay id across interrupted, resumed and repeated
runs; a self-contained, escaped HTML report; a progress total; Ctrl-C prints how to resume."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from guard.engines.cpu.engine import CpuEngine, CpuEngineConfig
from guard.prompts import PromptSet
from guard.samples import TEXTS
from guard.taxonomy import Taxonomy
from infra.stack import create_topics
from schemas.events import AuditRecord, DecisionSummary
from tests.conftest import Services
from tests.support import subprocess_env
from workers.audit.replay import Replayer, ReplayReport
from workers.audit.replay_report import (
    ReportContext,
    cumulative,
    estimate_total,
    label_name,
    render_html,
    write_reports,
)
from workers.demo.sample_feed import post
from workers.kafka.topics import produce_all, read_records
from workers.settings import Settings
from workers.wiring import build_moderator, build_worker

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = "Grandma's <b>garden</b> party & <script>alert(1)</script> tonight"


class Interrupt(Exception):
    pass


def live_labels(s: Settings) -> dict[str, bool | None]:
    return {
        json.loads(r.value or b"{}")["post_id"]: json.loads(r.value or b"{}")["safe"]
        for r in read_records(s.bootstrap_servers, s.verdicts_topic)
    }


def counts(md: str) -> dict[str, str]:
    return dict(re.findall(r"^\| ([^|]+?) \| (\d+) \|$", md, re.MULTILINE))


@pytest.mark.integration
def test_report_is_cumulative_across_interrupted_resumed_and_repeated_runs(
    kafka_settings: Settings, services: Services, cpu_engine: CpuEngine, prompts: PromptSet, tmp_path: Path
) -> None:
    texts = [t for _, t in TEXTS] + [HOSTILE]
    produce_all(
        kafka_settings.bootstrap_servers,
        kafka_settings.posts_topic,
        [(f"h{i}".encode(), post(f"h{i}", f"author-{i % 3}", t)) for i, t in enumerate(texts)],
    )
    build_worker(kafka_settings, cpu_engine).run(until_drained=True)
    live = live_labels(kafka_settings)
    assert len(live) == len(texts)
    expected_changed = sum(1 for safe in live.values() if safe is True)  # the strict replay flags all

    strict = CpuEngine(prompts, CpuEngineConfig(threshold=0.0), embedder=cpu_engine._emb)
    audit = kafka_settings.posts_topic + "-audit"
    create_topics(kafka_settings.bootstrap_servers, {audit: 1})
    rp = Replayer(
        build_moderator(kafka_settings.model_copy(update={"cache_enabled": False}), strict),
        kafka_settings.bootstrap_servers,
        verdicts_topic=kafka_settings.verdicts_topic,
        dlq_topic=kafka_settings.dlq_topic,
        audit_topic=audit,
        batch_size=3,
    )
    assert estimate_total(
        kafka_settings.bootstrap_servers, kafka_settings.posts_topic, None, None, None
    ) == len(texts)
    ctx = ReportContext(
        kafka_settings.posts_topic, strict.name, strict.model_version, strict.policy_version, prompts.taxonomy
    )
    md_path = tmp_path / "audit.md"

    def stop_after_first_batch(_n: int) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):  # an interrupted run: the first batch is on the audit topic
        rp.run("cum-1", kafka_settings.posts_topic, on_progress=stop_after_first_batch)
    partial, _ = write_reports(kafka_settings.bootstrap_servers, audit, ReplayReport("cum-1"), ctx, md_path)
    assert partial.written == 3

    resumed = rp.run("cum-1", kafka_settings.posts_topic)
    assert (resumed.total, resumed.skipped_done, resumed.written) == (len(texts), 3, len(texts) - 3)
    full, html_path = write_reports(kafka_settings.bootstrap_servers, audit, resumed, ctx, md_path)
    assert (full.written, full.changed) == (len(texts), expected_changed)
    assert sum(full.flips.values()) == len(texts)
    assert sum(full.change_kinds.values()) == full.change_kinds["safe_to_unsafe"] == expected_changed
    md_after_resume = counts(md_path.read_text())
    assert md_after_resume["audit records written"] == str(len(texts))
    assert md_after_resume["decisions changed"] == str(expected_changed)

    again = rp.run("cum-1", kafka_settings.posts_topic)  # finished: writes nothing
    assert again.written == 0
    same, _ = write_reports(kafka_settings.bootstrap_servers, audit, again, ctx, md_path)
    assert (same.written, same.changed, same.flips) == (full.written, full.changed, full.flips)
    md_again = counts(md_path.read_text())
    assert md_again.pop("already done (resumed)") == str(len(texts))  # this run's own count
    md_after_resume.pop("already done (resumed)")
    assert md_again == md_after_resume, "a re-run overwrote the report"

    page = html_path.read_text()
    assert html_path == tmp_path / "audit.html"
    assert "<h1>Replay <code>cum-1</code></h1>" in page
    assert re.search(rf'posts replayed \(all runs of this replay id\)</th><td class="n">{len(texts)}<', page)
    # the confusion matrix is labelled with category names, not only ids
    unsafe_labels = {lbl for (_a, lbl) in full.flips if lbl not in {"safe", "abstain", "novel"}}
    assert unsafe_labels
    for lbl in unsafe_labels:
        name = prompts.taxonomy.subcategory_name(lbl) or prompts.taxonomy.category_name(lbl)
        assert name and f"<th>{lbl} {name}</th>".replace("&", "&amp;") in page
    # change examples carry the post text (read back from the posts topic)
    flipped = [f"h{i}" for i in range(len(texts)) if live[f"h{i}"] is True]
    shown = [pid for pid in flipped if f"<code>{pid}</code>" in page]
    assert shown, "no change example in the report"
    for i, t in enumerate(texts):
        if f"h{i}" in shown and t != HOSTILE:
            assert t.replace("'", "&#x27;") in page
    assert "<script>" not in page and "http" not in page and "src=" not in page  # self-contained, escaped


def test_html_escapes_topic_data_and_names_categories(prompts: PromptSet) -> None:
    tax: Taxonomy = prompts.taxonomy
    sub = tax.categories[0].subcategories[0]
    old = DecisionSummary(safe=True, engine="cpu", model_version="m1", policy_version="p")
    new = DecisionSummary(
        safe=False,
        category=tax.categories[0].id,
        subcategory=sub.id,
        novel_risk="<img src=x onerror=alert(1)>",
        engine="cpu",
        model_version="m2",
        policy_version="p",
    )
    rec = AuditRecord(
        replay_id="r<1>",
        post_id="p&1",
        source_topic="posts",
        source_partition=0,
        source_offset=7,
        original=old,
        replayed=new,
        changed=True,
        changes=["safe_to_unsafe", "novel_risk_added"],
        replayed_at=datetime.now(UTC),
    )
    run = ReplayReport("r<1>", total=1, written=1)
    rep = cumulative([rec], run)
    page = render_html(
        rep, run, ReportContext("posts", "cpu", "m2", "p", tax), {(0, 7): "<script>alert('x')</script>"}
    )
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page and "&lt;img src=x" in page
    assert "r&lt;1&gt;" in page and "p&amp;1" in page
    assert f"{sub.id} {sub.name}".replace("&", "&amp;") in page and label_name(sub.id, tax) != sub.id
    assert 'class="n diff">1<' in page  # the off-diagonal (changed) cell is marked


@pytest.mark.integration
def test_ctrl_c_prints_how_to_resume_and_the_resumed_run_completes(
    kafka_settings: Settings, services: Services, cpu_engine: CpuEngine, tmp_path: Path
) -> None:
    n = 150
    produce_all(
        kafka_settings.bootstrap_servers,
        kafka_settings.posts_topic,
        [(f"c{i}".encode(), post(f"c{i}", "a", f"weekend hike number {i} by the lake")) for i in range(n)],
    )
    audit = kafka_settings.posts_topic + "-audit"
    create_topics(kafka_settings.bootstrap_servers, {audit: 1})
    env = subprocess_env(kafka_settings, GUARDSTREAM_LOG_FORMAT="json")
    report = tmp_path / "ctrl-c.md"
    argv = [sys.executable, "-m", "workers.cli", "replay", "--replay-id", "ctrlc", "--audit-topic", audit]
    argv += ["--no-cache", "--max-batch-size", "1", "--report", str(report)]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    watch = Consumer({"bootstrap.servers": kafka_settings.bootstrap_servers, "group.id": "unused"})
    try:
        # interrupt once the replay is demonstrably under way: its first audit record is on the topic
        watch.assign([TopicPartition(audit, 0, 0)])
        while proc.poll() is None and not [m for m in watch.consume(1, 1.0) if not m.error()]:
            pass
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        watch.close()
        if proc.poll() is None:
            proc.kill()
    written = len(read_records(kafka_settings.bootstrap_servers, audit))
    assert proc.returncode == 130 and 0 < written < n, (proc.returncode, written, err[-2000:])
    assert "Traceback" not in err
    (resume,) = re.findall(r"^\s+(guardstream replay .+)$", err, re.MULTILINE)
    assert "--replay-id ctrlc" in resume and f"--audit-topic {audit}" in resume
    assert not report.exists()

    # the printed command (plus the report path) finishes the replay; the report covers every post
    rest = subprocess.run(
        [sys.executable, "-m", "workers.cli", *resume.split()[1:], "--no-cache", "--report", str(report)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert len(read_records(kafka_settings.bootstrap_servers, audit)) == n
    md = counts(report.read_text())
    assert md["posts in range"] == str(n) and md["already done (resumed)"] == str(written)
    assert md["audit records written"] == str(n)  # cumulative, not only the resumed part
    assert report.with_suffix(".html").is_file()
    assert re.search(rf"{n}/{n}", rest.stderr), "the progress bar did not know its total"
