"""``guardstream tail``: follow verdicts, dead letters and alerts as a table or JSON lines."""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer

from workers.cli.base import BootstrapOpt, CliError, app, load_settings
from workers.cli.render import tail_row, tail_table, terminal


class Kind(StrEnum):
    VERDICTS = "verdicts"
    DEAD_LETTERS = "dead-letters"
    ALERTS = "alerts"


@app.command()
def tail(
    kinds: Annotated[
        list[Kind] | None,
        typer.Argument(help="What to follow: verdicts, dead-letters, alerts.", show_default="verdicts"),
    ] = None,
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Start at the oldest record, not at the end.")
    ] = False,
    limit: Annotated[int | None, typer.Option(help="Stop after this many records.", min=1)] = None,
    idle_timeout: Annotated[
        float | None,
        typer.Option(help="Stop after this many seconds without a record.", min=0.0, show_default="never"),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line (the record as on the topic).")
    ] = False,
    bootstrap_servers: BootstrapOpt = None,
) -> int:
    """Follow the output topics until Ctrl-C (or --limit / --idle-timeout)."""
    from workers.tail import TailError, follow

    s = load_settings(bootstrap_servers=bootstrap_servers)
    chosen = [k.value for k in dict.fromkeys(kinds or [Kind.VERDICTS])]
    out = terminal()
    first = True
    try:
        for batch in follow(
            s, chosen, from_beginning=from_beginning, limit=limit, idle_timeout_s=idle_timeout
        ):
            if as_json:
                for r in batch:
                    sys.stdout.write(r.raw.decode("utf-8", "replace") + "\n")
                sys.stdout.flush()
                continue
            for kind in chosen:
                rows = [r for r in batch if r.kind == kind]
                if not rows:
                    continue
                t = tail_table(kind)
                t.show_header = first
                for r in rows:
                    cells = tail_row(kind, r.value) if r.value is not None else ["(not JSON)"]
                    t.add_row(f"{r.partition}:{r.offset}", *cells)
                out.print(t)
                first = False
    except TailError as exc:
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        return 0
    return 0
