"""The ``guardstream`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from workers.logging import configure_logging
from workers.settings import Settings

if TYPE_CHECKING:
    from training.export import TrainingExporter

log = structlog.get_logger("guardstream")

TOPIC_PARTITIONS = {"posts": 3, "verdicts": 3, "novel-risks": 1, "posts-dlq": 1}


def _topics(s: Settings) -> dict[str, int]:
    return {s.posts_topic: 3, s.verdicts_topic: 3, s.novel_risk_topic: 1, s.dlq_topic: 1}


def _training_exporter(s: Settings) -> TrainingExporter:
    from guard.prompts import PromptSet
    from guard.taxonomy import Taxonomy
    from training.export import TrainingExporter
    from workers.app import build_fetcher

    return TrainingExporter(
        s.bootstrap_servers,
        PromptSet(Taxonomy.load(s.taxonomy_path)),
        build_fetcher(s),
        posts_topic=s.posts_topic,
        verdicts_topic=s.verdicts_topic,
        reviews_topic=s.reviews_topic,
    )


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    values: dict[str, object] = {}
    for name in (
        "bootstrap_servers",
        "engine",
        "max_batch_size",
        "max_wait_ms",
        "redis_url",
        "s3_endpoint_url",
        "group_id",
        "taxonomy_path",
        "metrics_port",
    ):
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def cmd_up(args: argparse.Namespace) -> int:
    """Start the local stack in the foreground and keep it up until Ctrl-C."""
    import boto3

    from infra.stack import LocalStack, create_topics, ensure_bucket

    s = _settings(args)
    stack = LocalStack(
        broker_port=args.broker_port, s3_port=args.s3_port, redis_url=s.redis_url, storage=args.storage
    ).start()
    try:
        create_topics(stack.broker.bootstrap, _topics(s))
        ensure_bucket(boto3.client("s3", endpoint_url=stack.s3.endpoint), s.allowed_buckets[0])
        log.info(
            "stack_up",
            broker=stack.broker.bootstrap,
            s3=stack.s3.endpoint,
            redis=s.redis_url,
            topics=list(_topics(s)),
            bucket=s.allowed_buckets[0],
            hint="Ctrl-C to stop",
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.app import build_worker
    from workers.metrics import start_metrics_server
    from workers.runner import PublishError, Unavailable

    s = _settings(args)
    if s.metrics_port:
        start_metrics_server(s.metrics_port, s.metrics_host)
    worker = build_worker(s)
    worker.install_signal_handlers()
    try:
        stats = worker.run(until_drained=args.until_drained)
    except (Unavailable, PublishError) as exc:
        # nothing of the unfinished batch was committed: it is re-delivered when a worker runs again
        log.error("worker_failed", error=str(exc), error_class=type(exc).__name__, exit_code=3)
        return 3
    log.info(
        "worker_stopped",
        consumed=stats.consumed,
        verdicts=stats.verdicts,
        dead_letters=stats.dead_letters,
        batches=stats.batches,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Bring up the embedded stack on free ports, seed the sample feed, moderate it, print the results."""
    import boto3
    from rich.console import Console
    from rich.table import Table

    from infra.stack import LocalStack, create_topics, ensure_bucket, free_port
    from workers.app import build_worker
    from workers.sample_feed import build_feed
    from workers.topics import produce_all, read_topic

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    base = _settings(args)
    stack = LocalStack(broker_port=free_port(), s3_port=free_port(), redis_url=base.redis_url).start()
    try:
        s = _settings(
            args,
            bootstrap_servers=stack.broker.bootstrap,
            s3_endpoint_url=stack.s3.endpoint,
            session_timeout_ms=6000,
        )
        create_topics(s.bootstrap_servers, _topics(s))
        s3 = boto3.client("s3", endpoint_url=s.s3_endpoint_url)
        ensure_bucket(s3, s.allowed_buckets[0])
        feed, objects = build_feed(s.allowed_buckets[0])
        alerts_proc = None
        if args.alerts:
            from workers.sample_feed import planted_burst

            feed += planted_burst()
            alerts_proc = start_alerts_subprocess(s)
        for key, data in objects.items():
            s3.put_object(Bucket=s.allowed_buckets[0], Key=key, Body=data)
        produce_all(s.bootstrap_servers, s.posts_topic, [(p.key, p.value) for p in feed])
        console.print(
            f"[bold]seeded[/] {len(feed)} posts and {len(objects)} objects; loading the "
            f"[bold]{s.engine.value}[/] engine…"
        )
        with console.status("moderating…"):
            worker = build_worker(s)
            t0 = time.perf_counter()
            stats = worker.run(until_drained=True)
            elapsed = time.perf_counter() - t0
        verdicts = [json.loads(v) for v in read_topic(s.bootstrap_servers, s.verdicts_topic)]
        dlq = [json.loads(v) for v in read_topic(s.bootstrap_servers, s.dlq_topic)]
        novel = read_topic(s.bootstrap_servers, s.novel_risk_topic)
        t = Table(title=f"verdicts ({len(verdicts)})")
        for col in ("post_id", "modality", "safe", "category", "novel risk", "p_unsafe", "cache"):
            t.add_column(col, no_wrap=True)
        t.add_column("note")
        for v in sorted(verdicts, key=lambda v: v["post_id"]):
            cat = v["subcategory"] or v["category"]
            name = v["subcategory_name"] or v["category_name"]
            p = v["scores"]["p_unsafe"]
            safe = {True: "[green]safe[/]", False: "[red]unsafe[/]", None: "[yellow]abstain[/]"}[v["safe"]]
            t.add_row(
                v["post_id"],
                v["modality"],
                safe,
                f"{cat} {name}" if cat else "",
                v["novel_risk"] or "",
                "" if p is None else f"{p:.2f}",
                "hit" if v["cache_hit"] else "",
                v["abstained_reason"] or "",
            )
        console.print(t)
        d = Table(title=f"dead letters ({len(dlq)})")
        for col in ("post_id", "error_code", "message"):
            d.add_column(col)
        for e in sorted(dlq, key=lambda e: e["source_offset"]):
            d.add_row(e["post_id"] or "?", e["error_code"], e["message"][:90])
        console.print(d)
        expected = Counter(p.expect for p in feed)
        console.print(
            f"{stats.consumed} posts in {elapsed:.1f}s: {len(verdicts)} verdicts, {len(dlq)} dead letters, "
            f"{len(novel)} novel-risk events; engine {verdicts[0]['engine'] if verdicts else '-'} "
            f"policy {verdicts[0]['policy_version'] if verdicts else '-'}"
        )
        if len(verdicts) != expected["verdict"] or len(dlq) != len(feed) - expected["verdict"]:
            console.print("[red]unexpected counts[/]")
            return 1
        if alerts_proc is not None:
            show_alert(s, alerts_proc, console)
        if args.replay_threshold is not None:
            console.print(
                f"\n[bold]audit replay[/] of the whole feed with the CPU engine at threshold "
                f"{args.replay_threshold} (live run: {s.cpu_threshold})"
            )
            run_replay(
                s.model_copy(update={"cpu_threshold": args.replay_threshold, "cache_enabled": False}),
                topic=s.posts_topic,
                start=None,
                end=None,
                partitions=None,
                replay_id="demo-replay",
                audit_topic="audit",
                report_path=Path(args.replay_report),
            )
            console.print(f"report written to {args.replay_report}")
        if args.export:
            demo_export(s, Path(args.export), console)
        return 0
    finally:
        stack.stop()


def run_replay(
    s: Settings,
    *,
    topic: str,
    start: str | None,
    end: str | None,
    partitions: list[int] | None,
    replay_id: str,
    audit_topic: str,
    report_path: Path,
) -> int:
    """Re-moderate a range of a topic; write audit records, a Markdown report and a terminal table."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from infra.stack import create_topics
    from workers.app import build_moderator
    from workers.replay import Replayer, parse_bound, render_markdown

    create_topics(s.bootstrap_servers, {audit_topic: 1})
    moderator = build_moderator(s)
    rp = Replayer(
        moderator,
        s.bootstrap_servers,
        verdicts_topic=s.verdicts_topic,
        dlq_topic=s.dlq_topic,
        audit_topic=audit_topic,
        batch_size=s.max_batch_size,
    )
    console = Console(stderr=True)
    with Progress(
        TextColumn(f"replay {replay_id}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.0f} posts/s"),
        TimeRemainingColumn(),
        console=console,
    ) as prog:
        task = prog.add_task("replay", total=None, rate=0.0)
        t0 = time.perf_counter()

        def advance(n: int) -> None:
            prog.advance(task, n)
            prog.update(task, rate=prog.tasks[0].completed / max(time.perf_counter() - t0, 1e-6))

        report = rp.run(
            replay_id, topic, parse_bound(start), parse_bound(end), partitions, on_progress=advance
        )
    eng = moderator.engine
    report_path.write_text(
        render_markdown(
            report, topic=topic, engine=eng.name, model=eng.model_version, policy=eng.policy_version
        ),
        encoding="utf-8",
    )
    t = Table(title=f"replay {replay_id} ({eng.name})")
    t.add_column("count")
    t.add_column("value", justify="right")
    for k, v in (
        ("posts in range", report.total),
        ("already done", report.skipped_done),
        ("audit records written", report.written),
        ("decisions changed", report.changed),
        ("no original verdict", report.missing_original),
    ):
        t.add_row(k, str(v))
    for kind, n in report.change_kinds.most_common():
        t.add_row(f"  {kind}", str(n))
    Console(width=150).print(t)
    log.info("replay_finished", replay_id=replay_id, report=str(report_path), audit_topic=audit_topic)
    moderator.close()
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from workers.replay import new_replay_id

    s = _settings(args)
    if args.no_cache:
        s = s.model_copy(update={"cache_enabled": False})
    if args.cpu_threshold is not None:
        s = s.model_copy(update={"cpu_threshold": args.cpu_threshold})
    replay_id = args.replay_id or new_replay_id()
    return run_replay(
        s,
        topic=args.topic or s.posts_topic,
        start=args.start,
        end=args.end,
        partitions=[int(p) for p in args.partition] if args.partition else None,
        replay_id=replay_id,
        audit_topic=args.audit_topic,
        report_path=Path(args.report or f"{replay_id}.md"),
    )


def cmd_audit_export(args: argparse.Namespace) -> int:
    from datetime import datetime as dt

    from workers.replay import export_decisions, parse_bound

    s = _settings(args)
    start, end = parse_bound(args.start), parse_bound(args.end)
    if not all(b is None or isinstance(b, dt) for b in (start, end)):
        raise SystemExit("audit-export takes times (ISO-8601), not offsets")
    n = export_decisions(
        s.bootstrap_servers,
        s.verdicts_topic,
        Path(args.out),
        start=start if isinstance(start, dt) else None,
        end=end if isinstance(end, dt) else None,
        author=args.author,
    )
    log.info("audit_export_written", path=args.out, decisions=n)
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    """Publish a human review label for one post (it overrides the model's label in training exports)."""
    from guard.taxonomy import Taxonomy
    from infra.stack import create_topics
    from schemas.events import ReviewEvent
    from workers.topics import produce_all

    s = _settings(args)
    if args.category and Taxonomy.load(s.taxonomy_path).resolve(args.category) is None:
        raise SystemExit(f"category {args.category!r} is not in the taxonomy")
    ev = ReviewEvent(
        post_id=args.post_id,
        unsafe=args.unsafe,
        category=args.category,
        novel_risk=args.novel,
        reviewer_id=args.reviewer,
        note=args.note,
    )
    create_topics(s.bootstrap_servers, {s.reviews_topic: 1})
    produce_all(s.bootstrap_servers, s.reviews_topic, [(ev.post_id.encode(), ev.model_dump_json().encode())])
    log.info(
        "review_published", post_id=ev.post_id, unsafe=ev.unsafe, category=ev.category, topic=s.reviews_topic
    )
    return 0


def cmd_export_training(args: argparse.Namespace) -> int:
    """Export posts + verdicts + reviews to a ProGuard-style RL dataset directory."""
    from datetime import datetime as dt

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from training.export import parse_ratios
    from workers.replay import parse_bound

    s = _settings(args)
    start, end = parse_bound(args.start), parse_bound(args.end)
    exp = _training_exporter(s)
    out = Path(args.out)
    with Progress(
        SpinnerColumn(), TextColumn("exporting: {task.completed} posts read"), console=Console(stderr=True)
    ) as prog:
        task = prog.add_task("export", total=None)
        rep = exp.export(
            out,
            start=start if isinstance(start, dt) else None,
            end=end if isinstance(end, dt) else None,
            ratios=parse_ratios(args.ratios),
            val_fraction=args.val_fraction,
            copy_images=not args.keep_s3_refs,
            on_progress=lambda n: prog.advance(task, n),
        )
    exp.close()
    Console().print((out / "README.md").read_text())
    log.info("training_export_written", out=str(out), splits=dict(rep.splits))
    return 0


def start_alerts_subprocess(s: Settings) -> Any:
    import subprocess

    from infra.stack import create_topics

    create_topics(s.bootstrap_servers, {s.novel_risk_topic: 1, s.alerts_topic: 1})
    env = {
        **os.environ,
        "GUARDSTREAM_BOOTSTRAP_SERVERS": s.bootstrap_servers,
        "GUARDSTREAM_NOVEL_RISK_TOPIC": s.novel_risk_topic,
        "GUARDSTREAM_ALERTS_TOPIC": s.alerts_topic,
        "GUARDSTREAM_ALERT_MIN_COUNT": "10",
        "GUARDSTREAM_ALERT_MIN_AUTHORS": "5",
        "GUARDSTREAM_SESSION_TIMEOUT_MS": "6000",
        "GUARDSTREAM_LOG_FORMAT": "json",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "alerts"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def show_alert(s: Settings, proc: Any, console: Any) -> None:
    """Wait (bounded) for the alerts app to publish an alert for the planted burst, then print it."""
    import signal

    from rich.table import Table

    from schemas.events import AlertEvent
    from workers.topics import read_topic

    deadline = time.monotonic() + 120
    alerts: list[AlertEvent] = []
    with console.status("alerts app: clustering novel-risk descriptions…"):
        while time.monotonic() < deadline and not alerts and proc.poll() is None:
            alerts = [
                AlertEvent.model_validate_json(v)
                for v in read_topic(s.bootstrap_servers, s.alerts_topic, timeout_s=3)
            ]
    t = Table(title=f"emerging-risk alerts ({len(alerts)})")
    for col in ("cluster", "representative", "size", "authors", "growth", "level", "examples"):
        t.add_column(col)
    for a in alerts:
        t.add_row(
            a.cluster_id,
            a.representative,
            str(a.size),
            str(a.distinct_authors),
            f"{a.growth:.0f}x",
            str(a.level),
            ", ".join(a.examples[:3]),
        )
    console.print(t)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def demo_export(s: Settings, out: Path, console: Any) -> None:
    """Reviewers label the demo's images (the CPU engine abstains on them) and correct one text verdict;
    then the feed is exported as a training set and the GRPO launcher's dry run scores it."""
    from infra.stack import create_topics
    from schemas.events import ReviewEvent
    from training import launch
    from training.export import parse_ratios
    from workers.topics import produce_all

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
    create_topics(s.bootstrap_servers, {s.reviews_topic: 1})
    produce_all(
        s.bootstrap_servers,
        s.reviews_topic,
        [(r.post_id.encode(), r.model_dump_json().encode()) for r in reviews],
    )
    exp = _training_exporter(s)
    exp.export(out, ratios=parse_ratios("1:1:1"), val_fraction=0.2)
    exp.close()
    console.print(f"\n[bold]training export[/] with {len(reviews)} reviews → {out}")
    console.print((out / "README.md").read_text())
    launch.main(["--dataset-dir", str(out), "--dry-run"])


def cmd_alerts(args: argparse.Namespace) -> int:
    """Run the emerging-risk alerts app (faust) until SIGTERM."""
    from infra.stack import create_topics
    from workers.alerts import run_app

    s = _settings(args)
    create_topics(s.bootstrap_servers, {s.novel_risk_topic: 1, s.alerts_topic: 1})
    run_app(s)
    return 0


def cmd_clusters(args: argparse.Namespace) -> int:
    """Print the alerts app's current clusters (from its changelog)."""
    from rich.console import Console
    from rich.table import Table

    from workers.alerts import read_clusters

    s = _settings(args)
    cfg = s.cluster_config()
    clusters = sorted(read_clusters(s).values(), key=lambda c: -c.size)
    t = Table(title=f"emerging-risk clusters ({len(clusters)})")
    for col in ("cluster", "label (medoid)", "size", "growth", "authors", "last seen", "alerted"):
        t.add_column(col)
    for c in clusters[: args.limit]:
        w = int(c.last_seen // cfg.window_s) * cfg.window_s
        prev = [c.windows.get(w - k * cfg.window_s, 0) for k in range(1, cfg.baseline_windows + 1)]
        growth = c.windows.get(w, 0) / max(sum(prev) / len(prev), 1.0)
        t.add_row(
            c.cluster_id,
            c.medoid()[:60],
            str(c.size),
            f"{growth:.1f}x",
            str(len(c.authors)),
            datetime.fromtimestamp(c.last_seen, UTC).isoformat(timespec="minutes"),
            f"level {c.level}" if c.level else "",
        )
    Console(width=160).print(t)
    return 0


def cmd_schemas(_args: argparse.Namespace) -> int:
    from schemas.export import main

    main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guardstream", description=__doc__)
    p.add_argument("--log-format", default=None, choices=["auto", "json", "console"])
    p.add_argument("--log-level", default=None)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--engine", choices=["cpu", "vllm", "vllm-server", "transformers"])
        sp.add_argument("--max-batch-size", type=int, dest="max_batch_size")
        sp.add_argument("--max-wait-ms", type=int, dest="max_wait_ms")
        sp.add_argument("--redis-url", dest="redis_url")
        sp.add_argument("--taxonomy", type=Path, dest="taxonomy_path")

    up = sub.add_parser("up", help="start the local broker + S3 server (+ Redis) in the foreground")
    common(up)
    up.add_argument("--broker-port", type=int, default=9092)
    up.add_argument("--s3-port", type=int, default=9000)
    up.add_argument(
        "--storage",
        default="memory://tansu/",
        help="memory://tansu/ (default) or s3://BUCKET/ (durable; needs AWS_ENDPOINT for MinIO/moto)",
    )
    up.set_defaults(func=cmd_up)

    w = sub.add_parser("worker", help="run the moderation worker")
    common(w)
    w.add_argument("--bootstrap-servers", dest="bootstrap_servers")
    w.add_argument("--s3-endpoint-url", dest="s3_endpoint_url")
    w.add_argument("--group-id", dest="group_id")
    w.add_argument("--metrics-port", type=int, dest="metrics_port")
    w.add_argument("--until-drained", action="store_true", help="exit once the posts topic is consumed")
    w.set_defaults(func=cmd_worker)

    d = sub.add_parser("demo", help="embedded stack + sample feed + worker; prints verdicts and dead letters")
    common(d)
    d.add_argument(
        "--replay-threshold", type=float, help="then replay the feed at this CPU threshold (audit)"
    )
    d.add_argument("--replay-report", default="demo-replay.md")
    d.add_argument("--export", help="then add reviews and export a training set to this directory")
    d.add_argument(
        "--alerts",
        action="store_true",
        help="also run the alerts app and plant an emerging-risk burst in the feed",
    )
    d.set_defaults(func=cmd_demo)

    rp = sub.add_parser("replay", help="re-moderate a topic range; write audit records and a report")
    common(rp)
    rp.add_argument("--bootstrap-servers", dest="bootstrap_servers")
    rp.add_argument("--s3-endpoint-url", dest="s3_endpoint_url")
    rp.add_argument("--topic", help="topic to replay (default: the posts topic)")
    rp.add_argument("--from", dest="start", help="offset or ISO-8601 time (inclusive)")
    rp.add_argument("--to", dest="end", help="offset or ISO-8601 time (inclusive)")
    rp.add_argument("--partition", action="append", help="only these partitions (repeatable)")
    rp.add_argument("--replay-id", help="re-use an id to resume or to make a re-run a no-op")
    rp.add_argument("--audit-topic", default="audit")
    rp.add_argument("--report", help="Markdown report path (default: <replay-id>.md)")
    rp.add_argument("--no-cache", action="store_true", help="do not read or write the verdict cache")
    rp.add_argument("--cpu-threshold", type=float, help="CPU engine p_unsafe cut-off for this replay")
    rp.set_defaults(func=cmd_replay)

    ae = sub.add_parser("audit-export", help="export decisions from the verdicts topic as JSONL")
    ae.add_argument("--bootstrap-servers", dest="bootstrap_servers")
    ae.add_argument("--from", dest="start", help="ISO-8601 decision time (inclusive)")
    ae.add_argument("--to", dest="end", help="ISO-8601 decision time (inclusive)")
    ae.add_argument("--author", help="only this author_id")
    ae.add_argument("--out", required=True)
    ae.set_defaults(func=cmd_audit_export)

    rv = sub.add_parser("review", help="publish a human review label for a post")
    rv.add_argument("post_id")
    g = rv.add_mutually_exclusive_group(required=True)
    g.add_argument("--unsafe", dest="unsafe", action="store_true")
    g.add_argument("--safe", dest="unsafe", action="store_false")
    rv.add_argument("--category", help="taxonomy id, e.g. C9S1")
    rv.add_argument("--novel", help="corrected novel-risk description (out-of-taxonomy)")
    rv.add_argument("--reviewer", required=True)
    rv.add_argument("--note")
    rv.add_argument("--bootstrap-servers", dest="bootstrap_servers")
    rv.add_argument("--taxonomy", type=Path, dest="taxonomy_path")
    rv.set_defaults(func=cmd_review)

    et = sub.add_parser("export-training", help="export labeled topics to a ProGuard RL dataset")
    et.add_argument("--bootstrap-servers", dest="bootstrap_servers")
    et.add_argument("--s3-endpoint-url", dest="s3_endpoint_url")
    et.add_argument("--taxonomy", type=Path, dest="taxonomy_path")
    et.add_argument("--from", dest="start", help="ISO-8601 post time (inclusive)")
    et.add_argument("--to", dest="end", help="ISO-8601 post time (inclusive)")
    et.add_argument("--out", required=True)
    et.add_argument("--ratios", default="1:1:1", help="text:image:text-image")
    et.add_argument("--val-fraction", type=float, default=0.1)
    et.add_argument("--keep-s3-refs", action="store_true", help="do not copy images; keep s3:// refs")
    et.set_defaults(func=cmd_export_training)

    al = sub.add_parser("alerts", help="run the emerging-risk alerts app (faust) over the novel-risk topic")
    al.add_argument("--bootstrap-servers", dest="bootstrap_servers")
    al.set_defaults(func=cmd_alerts)

    cl = sub.add_parser("clusters", help="print the alerts app's current clusters")
    cl.add_argument("--bootstrap-servers", dest="bootstrap_servers")
    cl.add_argument("--limit", type=int, default=30)
    cl.set_defaults(func=cmd_clusters)

    sc = sub.add_parser("schemas", help="write JSON Schema files to schemas/json/")
    sc.set_defaults(func=cmd_schemas)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = Settings()
    # the demo prints its own tables; per-post log lines would drown them unless asked for
    default_level = (
        "WARNING" if args.cmd == "demo" and "GUARDSTREAM_LOG_LEVEL" not in os.environ else env.log_level
    )
    configure_logging(args.log_format or env.log_format, args.log_level or default_level)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
