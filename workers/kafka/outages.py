"""An infrastructure dependency that is down (a dead engine, an unavailable S3): since when, when to try
again, and when to give up.

Outages are not dead letters: the worker stops admitting, keeps the affected records uncommitted, retries
them with a backoff that doubles up to ``MAX_BACKOFF_S``, reports itself not ready, and exits (code 3)
once the dependency has been down past its deadline. The broker's own outages are timed by
``workers.kafka.broker_watch`` (librdkafka reconnects by itself; there is nothing to re-submit).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from workers.kafka.errors import Unavailable

log = structlog.get_logger(__name__)

MAX_BACKOFF_S = 30.0


@dataclass(slots=True)
class Outage:
    """One dependency (``name``: "engine" or "media"), and ``GUARDSTREAM_<NAME>_DEADLINE_S``."""

    name: str
    deadline_s: float
    backoff_s: float
    error: type[Unavailable]
    since: float | None = None
    next_try: float = 0.0
    delay: float = 0.0

    @property
    def is_down(self) -> bool:
        return self.since is not None

    def down(self, now: float, error: str) -> None:
        """A request or fetch failed for want of the dependency (many may in one round: only the first
        starts the outage; the backoff grows once per retry round, in ``retried``)."""
        if self.since is None:
            self.since, self.delay = now, self.backoff_s
            self.next_try = now + self.delay
            log.warning(f"{self.name}_unavailable_retrying", error=error[:300], deadline_s=self.deadline_s)

    def due(self, now: float) -> bool:
        """Time for the next retry round."""
        return now >= self.next_try

    def retried(self, now: float) -> None:
        self.delay = min(self.delay * 2, MAX_BACKOFF_S)
        self.next_try = now + self.delay

    def up(self, now: float) -> None:
        if self.since is not None:
            log.info(f"{self.name}_available_again", down_for_s=round(now - self.since, 1))
        self.since = None

    def raise_if_overdue(self, now: float) -> None:
        """Give up (``error``, exit 3) once the dependency has been down past its deadline."""
        if self.since is None or now - self.since <= self.deadline_s:
            return
        down_for = now - self.since
        log.error(f"{self.name}_unavailable_giving_up", down_for_s=round(down_for, 1))
        setting = f"GUARDSTREAM_{self.name.upper()}_DEADLINE_S"
        raise self.error(
            f"{self.name} unavailable for {down_for:.0f}s "
            f"(deadline {self.deadline_s:g}s, {setting}); nothing past it was committed"
        )
