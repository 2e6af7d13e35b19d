"""``guardstream demo``: the embedded stack on free ports, the sample feed, the worker, the results."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from guard.config import CpuConfig
from workers.cli.base import (
    CliError,
    EngineOpt,
    MaxBatchOpt,
    MaxWaitOpt,
    RedisOpt,
    TaxonomyOpt,
    app,
    load_settings,
)
from workers.cli.render import alerts_table, dead_letters_table, terminal, verdicts_table
from workers.cli.replay import run_replay
from workers.cli.topics import worker_topics
from workers.settings import Settings, child_environ


@app.command()
def demo(
    engine: EngineOpt = None,
    max_batch_size: MaxBatchOpt = None,
    max_wait_ms: MaxWaitOpt = None,
    redis_url: RedisOpt = None,
    taxonomy_path: TaxonomyOpt = None,
    replay_threshold: Annotated[
        float | None,
        typer.Option(help="Then replay the feed at this CPU threshold (audit).", min=0.0, max=1.0),
    ] = None,
    replay_report: Annotated[Path, typer.Option(help="Markdown report of that replay.")] = Path(
        "demo-replay.md"
    ),
    export: Annotated[
        Path | None, typer.Option(help="Then add reviews and export a training set to this directory.")
    ] = None,
    alerts: Annotated[
        bool, typer.Option("--alerts", help="Also run the alerts app and plant an emerging-risk burst.")
    ] = False,
    console: Annotated[
        bool, typer.Option("--console", help="Then serve the review console on the demo topics.")
    ] = False,
) -> int:
    """Embedded stack + sample feed + worker; prints verdicts and dead letters."""
    import boto3

    from infra.stack import LocalStack, StackError, create_topics, ensure_bucket, free_port
    from workers.cli.base import writable_dir, writable_file
    from workers.demo.sample_feed import build_feed
    from workers.kafka.topics import produce_all, read_topic
    from workers.wiring import build_worker

    out = terminal()
    overrides: dict[str, Any] = {
        "engine": engine,
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "redis_url": redis_url,
        "taxonomy_path": taxonomy_path,
    }
    base = load_settings(**overrides)
    if replay_threshold is not None:
        writable_file(replay_report, "--replay-report")
    if export is not None:
        writable_dir(export, "--export")
    if console:  # the `console` extra: a missing one is reported now, not after the whole demo ran
        from workers.console import server as _console_server  # noqa: F401
    try:
        stack = LocalStack(
            broker_port=free_port(),
            s3_port=free_port(),
            redis_url=base.cache.url,
            # a Redis the demo starts is stopped at the end; its cache is kept here for the next run
            redis_data_dir=".guardstream/redis",
        ).start()
    except StackError as exc:  # no redis-server, a Redis port it cannot use: one line, exit 1
        raise CliError(str(exc)) from None
    try:
        s = load_settings(
            **overrides,
            bootstrap_servers=stack.broker.bootstrap,
            s3_endpoint_url=stack.s3.endpoint,
            session_timeout_ms=6000,
        )
        create_topics(s.kafka.bootstrap_servers, worker_topics(s), extra=s.kafka.extra)
        s3 = boto3.client("s3", endpoint_url=s.media.s3_endpoint_url)
        ensure_bucket(s3, s.media.allowed_buckets[0])
        feed, objects = build_feed(s.media.allowed_buckets[0])
        alerts_proc = None
        if alerts:
            from workers.demo.sample_feed import planted_burst

            feed += planted_burst()
            alerts_proc = start_alerts_subprocess(s)
        for key, data in objects.items():
            s3.put_object(Bucket=s.media.allowed_buckets[0], Key=key, Body=data)
        produce_all(
            s.kafka.bootstrap_servers,
            s.kafka.posts_topic,
            [(p.key, p.value) for p in feed],
            extra=s.kafka.extra,
        )
        out.print(
            f"[bold]seeded[/] {len(feed)} posts and {len(objects)} objects; loading the "
            f"[bold]{s.engine.value}[/] engine…"
        )
        with out.status("moderating…"):
            worker = build_worker(s)
            t0 = time.perf_counter()
            stats = worker.run(until_drained=True)
            elapsed = time.perf_counter() - t0
        bs, ex = s.kafka.bootstrap_servers, s.kafka.extra
        verdicts = [json.loads(v) for v in read_topic(bs, s.kafka.verdicts_topic, extra=ex)]
        dlq = [json.loads(v) for v in read_topic(bs, s.kafka.dlq_topic, extra=ex)]
        novel = read_topic(bs, s.kafka.novel_risk_topic, extra=ex)
        out.print(verdicts_table(sorted(verdicts, key=lambda v: v["post_id"])))
        out.print(dead_letters_table(sorted(dlq, key=lambda e: e["source_offset"])))
        expected = Counter(p.expect for p in feed)
        out.print(
            f"{stats.consumed} posts in {elapsed:.1f}s: {len(verdicts)} verdicts, {len(dlq)} dead letters, "
            f"{len(novel)} novel-risk events; engine {verdicts[0]['engine'] if verdicts else '-'} "
            f"policy {verdicts[0]['policy_version'] if verdicts else '-'}"
        )
        if len(verdicts) != expected["verdict"] or len(dlq) != len(feed) - expected["verdict"]:
            out.print("[red]unexpected counts[/]")
            return 1
        if alerts_proc is not None:
            show_alert(s, alerts_proc, out)
        if replay_threshold is not None:
            live: object = s.engine.value
            if isinstance(s.engine_config, CpuConfig):
                live = s.engine_config.threshold or "the head's, 0.5"
            out.print(
                f"\n[bold]audit replay[/] of the whole feed with the CPU engine at threshold "
                f"{replay_threshold} (live run: {live})"
            )
            run_replay(
                s.model_copy(update={"cpu_threshold": replay_threshold, "cache_enabled": False}),
                topic=s.kafka.posts_topic,
                start=None,
                end=None,
                partitions=None,
                replay_id="demo-replay",
                audit_topic="audit",
                report_path=replay_report,
            )
            out.print(f"reports written to {replay_report} and {replay_report.with_suffix('.html')}")
        if export is not None:
            demo_export(s, export, out)
        if console:
            from workers.console.server import run_blocking
            from workers.console.settings import ConsoleSettings

            out.print("[bold]review console[/] (Ctrl-C stops it and the local stack)")
            # a fresh broker each demo: the demo's own key prefix is emptied so no stale posts show up
            cs = ConsoleSettings(**{**s.model_dump(), "console_prefix": "gs:console:demo:"})
            # the stack lives as long as the console: export the labels from another terminal meanwhile
            out.print(
                "labels → next training export: AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing "
                "guardstream export-training --out ./export "
                f"--bootstrap-servers {s.kafka.bootstrap_servers} "
                f"--s3-endpoint-url {s.media.s3_endpoint_url}",
                soft_wrap=True,  # commands and URLs stay on one line, to be copied
            )
            return run_blocking(cs, "demo-reviewer", lambda m: out.print(m, soft_wrap=True), fresh=True)
        return 0
    finally:
        stack.stop()


def start_alerts_subprocess(s: Settings) -> subprocess.Popen[bytes]:
    from infra.stack import create_topics

    create_topics(
        s.kafka.bootstrap_servers, {s.kafka.novel_risk_topic: 1, s.kafka.alerts_topic: 1}, extra=s.kafka.extra
    )
    env = {  # the demo's settings (its stack, topics, KAFKA_EXTRA), with an alert rule the feed's burst trips
        **child_environ(s),
        "GUARDSTREAM_ALERT_MIN_COUNT": "10",
        "GUARDSTREAM_ALERT_MIN_AUTHORS": "5",
        "GUARDSTREAM_LOG_FORMAT": "json",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "alerts"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def show_alert(s: Settings, proc: subprocess.Popen[bytes], out: Console) -> None:
    """Wait (bounded) for the alerts app to publish an alert for the planted burst, then print it."""
    import signal

    from workers.kafka.topics import read_topic

    deadline = time.monotonic() + 120
    alerts: list[dict[str, Any]] = []
    with out.status("alerts app: clustering novel-risk descriptions…"):
        while time.monotonic() < deadline and not alerts and proc.poll() is None:
            alerts = [
                json.loads(v)
                for v in read_topic(
                    s.kafka.bootstrap_servers, s.kafka.alerts_topic, timeout_s=3, extra=s.kafka.extra
                )
            ]
    out.print(alerts_table(alerts))
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def demo_export(s: Settings, out_dir: Path, out: Console) -> None:
    """Reviewers label the demo's images (the CPU engine abstains on them) and correct one text verdict;
    then the feed is exported as a training set and the GRPO launcher's dry run scores it."""
    from infra.stack import create_topics
    from schemas.events import ReviewEvent
    from training import launch
    from training.export import parse_ratios
    from workers.cli.export_training import training_exporter
    from workers.kafka.topics import produce_all

    reviews = [
        ReviewEvent(post_id="demo-image-0", unsafe=False, reviewer_id="demo-reviewer"),
        ReviewEvent(post_id="demo-image-1", unsafe=True, category="C10S2", reviewer_id="demo-reviewer"),
        ReviewEvent(
            post_id="demo-image-2",
            unsafe=True,
            novel_risk="Staged Accident Prank",
            reviewer_id="demo-reviewer",
        ),
        ReviewEvent(
            post_id="demo-text-2", unsafe=False, reviewer_id="demo-reviewer", note="confirmed benign"
        ),
    ]
    create_topics(s.kafka.bootstrap_servers, {s.kafka.reviews_topic: 1}, extra=s.kafka.extra)
    produce_all(
        s.kafka.bootstrap_servers,
        s.kafka.reviews_topic,
        [(r.post_id.encode(), r.model_dump_json().encode()) for r in reviews],
        extra=s.kafka.extra,
    )
    exp = training_exporter(s)
    exp.export(out_dir, ratios=parse_ratios("1:1:1"), val_fraction=0.2)
    exp.close()
    out.print(f"\n[bold]training export[/] with {len(reviews)} reviews → {out_dir}")
    out.print((out_dir / "README.md").read_text())
    launch.main(["--dataset-dir", str(out_dir), "--dry-run"])
