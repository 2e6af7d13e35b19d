"""guardstream benchmarks on the real local broker (Tansu), S3 server (moto) and Redis.

    python -m bench                          # full run, a few minutes on 2 cores
    python -m bench --quick                  # small sizes (smoke)
    python -m bench --only overhead,cache    # some sections (always run in the order below)

Each section prints a table and a ratio against a baseline measured in the same run:
{sections}

Throughput is measured from the first published post to the last, so group joins and model loads are
excluded from both sides.

Layout: bench/harness.py (the stack, sizes, timing, tables, child processes, the section registry),
bench/baselines.py (the raw confluent-kafka loop and the minimal per-post work), bench/sections/ (one
module per section).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any

from bench.harness import FULL, QUICK, Ctx, Section, by_name, local_stack, registry, run_child
from workers.observability.logging import configure_logging


def describe(sections: list[Section]) -> str:
    """The numbered list of sections for --help, from the registry."""
    lines: list[str] = []
    pad = max((len(s.name) for s in sections), default=0)
    for i, sec in enumerate(sections, 1):
        head = f"{i}. {sec.name + ':':{pad + 1}} "
        lines += textwrap.wrap(
            sec.summary, 108, initial_indent=head, subsequent_indent=" " * len(head), break_on_hyphens=False
        )
    return "\n".join(lines)


def parse_only(value: str) -> list[Section]:
    """``--only a,b``: those sections, in registry order; an unknown name is an error naming the choices."""
    known = by_name()
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        what = f"unknown section {', '.join(map(repr, unknown))}" if unknown else "no section named"
        raise argparse.ArgumentTypeError(f"{what}; choose from {','.join(known)}")
    return [s for s in registry() if s.name in names]


def parser() -> argparse.ArgumentParser:
    sections = registry()
    doc = (__doc__ or "").format(sections=describe(sections))
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument(
        "--only",
        type=parse_only,
        default=",".join(s.name for s in sections),
        metavar="NAME[,NAME…]",
        help=f"sections to run (default: all): {','.join(s.name for s in sections)}",
    )
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    configure_logging("json", "WARNING")
    if a.child:
        name, *args = a.child
        return run_child(name, args)
    sizes = QUICK if a.quick else FULL
    results: dict[str, Any] = {}
    with local_stack() as env:
        ctx = Ctx(env, sizes)
        for sec in a.only:
            results[sec.key] = sec.run(ctx)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
