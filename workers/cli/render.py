"""Rendering only: rich tables and lines built from already-computed data (no Kafka, no settings)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

SAFE_MARKUP = {True: "[green]safe[/]", False: "[red]unsafe[/]", None: "[yellow]abstain[/]"}


def terminal(stderr: bool = False, width: int = 150) -> Console:
    """A console that keeps tables readable when piped (no terminal: a fixed width, no wrapping)."""
    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=width)


def verdicts_table(verdicts: Sequence[Mapping[str, Any]], title: str | None = None) -> Table:
    t = Table(title=title or f"verdicts ({len(verdicts)})")
    for col in ("post_id", "modality", "safe", "category", "novel risk", "p_unsafe", "cache"):
        t.add_column(col, no_wrap=True)
    t.add_column("note")
    for v in verdicts:
        t.add_row(*verdict_row(v))
    return t


def verdict_row(v: Mapping[str, Any]) -> list[str]:
    cat = v.get("subcategory") or v.get("category")
    name = v.get("subcategory_name") or v.get("category_name") or ""
    p = (v.get("scores") or {}).get("p_unsafe")
    return [
        str(v.get("post_id")),
        str(v.get("modality", "")),
        SAFE_MARKUP.get(v.get("safe"), "?"),
        f"{cat} {name}" if cat else "",
        v.get("novel_risk") or "",
        "" if p is None else f"{p:.2f}",
        "hit" if v.get("cache_hit") else "",
        v.get("abstained_reason") or "",
    ]


def dead_letters_table(dlq: Sequence[Mapping[str, Any]], title: str | None = None) -> Table:
    d = Table(title=title or f"dead letters ({len(dlq)})")
    for col in ("post_id", "error_code", "message"):
        d.add_column(col)
    for e in dlq:
        d.add_row(*dead_letter_row(e))
    return d


def dead_letter_row(e: Mapping[str, Any]) -> list[str]:
    return [str(e.get("post_id") or "?"), str(e.get("error_code")), str(e.get("message", ""))[:90]]


def alerts_table(alerts: Sequence[Mapping[str, Any]], title: str | None = None) -> Table:
    t = Table(title=title or f"emerging-risk alerts ({len(alerts)})")
    for col in ("cluster", "representative", "size", "authors", "growth", "level", "examples"):
        t.add_column(col)
    for a in alerts:
        t.add_row(*alert_row(a))
    return t


def alert_row(a: Mapping[str, Any]) -> list[str]:
    return [
        str(a.get("cluster_id")),
        str(a.get("representative")),
        str(a.get("size")),
        str(a.get("distinct_authors")),
        f"{float(a.get('growth') or 0):.0f}x",
        str(a.get("level")),
        ", ".join(list(a.get("examples") or [])[:3]),
    ]


def counts_table(title: str, rows: Iterable[tuple[str, object]]) -> Table:
    t = Table(title=title)
    t.add_column("count")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def clusters_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    t = Table(title=f"emerging-risk clusters ({len(rows)})")
    for col in ("cluster", "label (medoid)", "size", "growth", "authors", "last seen", "alerted"):
        t.add_column(col)
    for c in rows:
        t.add_row(
            str(c["cluster_id"]),
            str(c["label"])[:60],
            str(c["size"]),
            f"{c['growth']:.1f}x",
            str(c["authors"]),
            datetime.fromtimestamp(c["last_seen"], UTC).isoformat(timespec="minutes"),
            f"level {c['level']}" if c["level"] else "",
        )
    return t


def topics_table(created: Mapping[str, int], existing: Mapping[str, int]) -> Table:
    t = Table(title="topics")
    for col in ("topic", "partitions", "state"):
        t.add_column(col)
    for name, n in created.items():
        t.add_row(name, str(n), "[green]created[/]")
    for name, n in existing.items():
        t.add_row(name, str(n), "exists")
    return t


def tail_table(kind: str) -> Table:
    """An empty table for ``guardstream tail`` of ``kind`` (rows come from ``tail_row``)."""
    cols = {
        "verdicts": ["post_id", "modality", "safe", "category", "novel risk", "p_unsafe", "cache", "note"],
        "dead-letters": ["post_id", "error_code", "message"],
        "alerts": ["cluster", "representative", "size", "authors", "growth", "level", "examples"],
    }[kind]
    t = Table(title=kind, show_edge=False)
    t.add_column("partition:offset", no_wrap=True)
    for c in cols:
        t.add_column(c)
    return t


def tail_row(kind: str, value: Mapping[str, Any]) -> list[str]:
    if kind == "verdicts":
        return verdict_row(value)
    if kind == "dead-letters":
        return dead_letter_row(value)
    return alert_row(value)
