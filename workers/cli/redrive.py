"""``guardstream redrive``: dead letters of chosen error codes back to the posts topic."""

from __future__ import annotations

from typing import Annotated

import typer

from workers.cli.base import BootstrapOpt, CliError, app, load_settings


@app.command()
def redrive(
    code: Annotated[list[str], typer.Option(help="Error code to redrive (repeatable).")],
    bootstrap_servers: BootstrapOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be redriven; write nothing.")
    ] = False,
    limit: Annotated[
        int | None, typer.Option(help="Redrive at most this many dead letters.", min=1, show_default="all")
    ] = None,
) -> int:
    """Re-process dead letters of chosen error codes (idempotent)."""
    from schemas.events import ErrorCode
    from workers.redrive import redrive as run_redrive

    s = load_settings(bootstrap_servers=bootstrap_servers)
    known = {c.value for c in ErrorCode}
    unknown = sorted(set(code) - known)
    if unknown:
        raise CliError(f"unknown error code(s) {unknown}; choose from {sorted(known)}")
    rep = run_redrive(
        s.kafka.bootstrap_servers,
        dlq_topic=s.kafka.dlq_topic,
        posts_topic=s.kafka.posts_topic,
        codes=set(code),
        dry_run=dry_run,
        limit=limit,
        kafka_extra=s.kafka.extra,
    )
    verb = "would redrive" if rep.dry_run else "redriven"
    print(
        f"matched {rep.matched}, already redriven {rep.already}, unrecoverable {rep.unrecoverable}, "
        f"{verb} {sum(rep.by_code.values())} {dict(rep.by_code)} -> {s.kafka.posts_topic}"
    )
    return 0
