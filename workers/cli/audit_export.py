"""``guardstream audit-export``: the decisions of a time range as JSON lines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from workers.cli.base import BootstrapOpt, app, load_settings, log, writable_file
from workers.cli.bounds import time_range


@app.command("audit-export")
def audit_export(
    out: Annotated[Path, typer.Option(help="JSONL file to write.", dir_okay=False)],
    bootstrap_servers: BootstrapOpt = None,
    start: Annotated[
        str | None, typer.Option("--from", help="ISO-8601 decision time (inclusive).", show_default="start")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="ISO-8601 decision time (inclusive).", show_default="end")
    ] = None,
    author: Annotated[str | None, typer.Option(help="Only this author_id.", show_default="all")] = None,
) -> int:
    """Export decisions from the verdicts topic as JSONL."""
    from workers.audit.replay import export_decisions

    s = load_settings(bootstrap_servers=bootstrap_servers)
    lo, hi = time_range(start, end)
    writable_file(out)
    n = export_decisions(
        s.kafka.bootstrap_servers,
        s.kafka.verdicts_topic,
        out,
        start=lo,
        end=hi,
        author=author,
        kafka_extra=s.kafka.extra,
    )
    log.info("audit_export_written", path=str(out), decisions=n)
    return 0
