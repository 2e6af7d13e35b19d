"""``--from``/``--to`` of the commands that read a range of a topic: offsets or ISO-8601 times."""

from __future__ import annotations

from datetime import datetime

from workers.cli.base import UsageError

Bound = int | datetime | None


def parse_bound_opt(text: str | None, flag: str, times_only: bool = False) -> Bound:
    """``--from``/``--to``: an offset or an ISO-8601 time; a bad value is one line naming the flag."""
    from workers.audit.replay import parse_bound

    try:
        b = parse_bound(text)
    except ValueError:
        what = "an ISO-8601 time (2026-01-31T12:00:00Z)" if times_only else "an offset or an ISO-8601 time"
        raise UsageError(f"{flag} {text!r}: expected {what}") from None
    if times_only and isinstance(b, int):
        raise UsageError(f"{flag} {text!r}: this command takes ISO-8601 times, not offsets")
    return b


def check_range(start: Bound, end: Bound) -> None:
    if start is None or end is None:
        return
    if isinstance(start, datetime) != isinstance(end, datetime):
        raise UsageError("--from and --to must both be offsets or both be times")
    if start > end:  # type: ignore[operator]
        raise UsageError(f"--from {start} is after --to {end}: the range is empty")


def time_range(start_text: str | None, end_text: str | None) -> tuple[datetime | None, datetime | None]:
    start = parse_bound_opt(start_text, "--from", times_only=True)
    end = parse_bound_opt(end_text, "--to", times_only=True)
    check_range(start, end)
    assert not isinstance(start, int) and not isinstance(end, int)
    return start, end
