"""``guardstream replay``: re-moderate a range of a topic for an audit."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Annotated

import typer

from workers.cli.base import (
    BootstrapOpt,
    EngineOpt,
    MaxBatchOpt,
    MaxWaitOpt,
    RedisOpt,
    S3EndpointOpt,
    TaxonomyOpt,
    app,
    ctrl_c_requests_stop,
    load_settings,
    log,
    writable_file,
)
from workers.cli.bounds import check_range, parse_bound_opt
from workers.cli.render import counts_table, terminal
from workers.settings import Settings


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
    """Re-moderate a range of a topic; write audit records, the cumulative Markdown + HTML reports of the
    replay id (``workers/audit/replay_report.py``) and a terminal table. Ctrl-C prints the resume command."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from guard.taxonomy import Taxonomy
    from infra.stack import create_topics
    from workers.audit.replay import Replayer, ReplayInterrupted
    from workers.audit.replay_report import ReportContext, estimate_total, write_reports
    from workers.wiring import build_moderator

    lo, hi = parse_bound_opt(start, "--from"), parse_bound_opt(end, "--to")
    check_range(lo, hi)
    writable_file(report_path, "--report")
    create_topics(s.kafka.bootstrap_servers, {audit_topic: 1}, extra=s.kafka.extra)
    moderator = build_moderator(s)
    rp = Replayer(
        moderator,
        s.kafka.bootstrap_servers,
        verdicts_topic=s.kafka.verdicts_topic,
        dlq_topic=s.kafka.dlq_topic,
        audit_topic=audit_topic,
        batch_size=s.max_batch_size,
        kafka_extra=s.kafka.extra,
    )
    with Progress(
        TextColumn(f"replay {replay_id}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.0f} posts/s"),
        TimeRemainingColumn(),
        console=terminal(stderr=True),
    ) as prog:
        total = estimate_total(s.kafka.bootstrap_servers, topic, lo, hi, partitions, s.kafka.extra)
        task = prog.add_task("replay", total=total, rate=0.0)
        t0 = time.perf_counter()

        def advance(n: int) -> None:
            prog.advance(task, n)
            prog.update(task, rate=prog.tasks[0].completed / max(time.perf_counter() - t0, 1e-6))

        try:
            with ctrl_c_requests_stop() as stop:
                run_report = rp.run(
                    replay_id, topic, lo, hi, partitions, on_progress=advance, stop=stop.is_set
                )
        except (KeyboardInterrupt, ReplayInterrupted):
            moderator.close()
            prog.stop()
            err = terminal(stderr=True)
            err.print(f"[yellow]interrupted[/]: what was written is kept on {audit_topic}. Resume with:")
            err.print(
                "  " + resume_command(replay_id, topic, audit_topic, start, end, partitions),
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Abort() from None
        prog.update(task, total=prog.tasks[0].completed)  # the estimate is an upper bound on some brokers
    eng = moderator.engine
    ctx = ReportContext(
        topic, eng.name, eng.model_version, eng.policy_version, Taxonomy.load(s.engine_config.taxonomy_path)
    )
    # cumulative over every run of this replay id (a resumed or repeated run reports the whole replay)
    report, html_path = write_reports(
        s.kafka.bootstrap_servers, audit_topic, run_report, ctx, report_path, s.kafka.extra
    )
    rows: list[tuple[str, object]] = [
        ("posts in range", report.total),
        ("already done", report.skipped_done),
        ("audit records written (this run)", run_report.written),
        ("posts replayed (all runs of this id)", report.written),
        ("decisions changed", report.changed),
        ("no original verdict", report.missing_original),
    ]
    rows += [(f"  {kind}", n) for kind, n in report.change_kinds.most_common()]
    terminal().print(counts_table(f"replay {replay_id} ({eng.name})", rows))
    log.info(
        "replay_finished",
        replay_id=replay_id,
        report=str(report_path),
        html_report=str(html_path),
        audit_topic=audit_topic,
    )
    moderator.close()
    return 0


def resume_command(
    replay_id: str,
    topic: str,
    audit_topic: str,
    start: str | None,
    end: str | None,
    partitions: list[int] | None,
) -> str:
    """The command that resumes an interrupted replay (same id: positions already audited are skipped)."""
    return shlex.join(
        ["guardstream", "replay", "--replay-id", replay_id, "--topic", topic, "--audit-topic", audit_topic]
        + (["--from", start] if start else [])
        + (["--to", end] if end else [])
        + [a for p in partitions or [] for a in ("--partition", str(p))]
    )


@app.command()
def replay(
    bootstrap_servers: BootstrapOpt = None,
    s3_endpoint_url: S3EndpointOpt = None,
    engine: EngineOpt = None,
    max_batch_size: MaxBatchOpt = None,
    max_wait_ms: MaxWaitOpt = None,
    redis_url: RedisOpt = None,
    taxonomy_path: TaxonomyOpt = None,
    topic: Annotated[
        str | None, typer.Option(help="Topic to replay.", show_default="the posts topic")
    ] = None,
    start: Annotated[
        str | None, typer.Option("--from", help="Offset or ISO-8601 time (inclusive).", show_default="start")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="Offset or ISO-8601 time (inclusive).", show_default="end")
    ] = None,
    partition: Annotated[
        list[int] | None, typer.Option(help="Only these partitions (repeatable).", min=0, show_default="all")
    ] = None,
    replay_id: Annotated[
        str | None,
        typer.Option(help="Re-use an id to resume or to make a re-run a no-op.", show_default="a new id"),
    ] = None,
    audit_topic: Annotated[str, typer.Option(help="Topic of the audit records.")] = "audit",
    report: Annotated[
        Path | None, typer.Option(help="Markdown report path.", show_default="<replay-id>.md")
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Do not read or write the verdict cache.")
    ] = False,
    cpu_threshold: Annotated[
        float | None,
        typer.Option(
            help="CPU engine p_unsafe cut-off for this replay.",
            min=0.0,
            max=1.0,
            envvar="GUARDSTREAM_CPU_THRESHOLD",
            show_envvar=True,
            show_default="the head's operating point, 0.5",
        ),
    ] = None,
) -> int:
    """Re-moderate a topic range; write audit records and a report."""
    from workers.audit.replay import new_replay_id

    s = load_settings(
        bootstrap_servers=bootstrap_servers,
        s3_endpoint_url=s3_endpoint_url,
        engine=engine,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        redis_url=redis_url,
        taxonomy_path=taxonomy_path,
        cpu_threshold=cpu_threshold,
    )
    if no_cache:
        s = s.model_copy(update={"cache_enabled": False})
    rid = replay_id or new_replay_id()
    return run_replay(
        s,
        topic=topic or s.kafka.posts_topic,
        start=start,
        end=end,
        partitions=partition or None,
        replay_id=rid,
        audit_topic=audit_topic,
        report_path=report or Path(f"{rid}.md"),
    )
