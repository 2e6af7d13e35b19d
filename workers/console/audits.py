"""The audits pages' data: replay runs read from the audit topic and summarised per ``replay_id``
(the same counts, change kinds and flip matrix as ``guardstream replay``'s Markdown report)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from schemas.events import AuditRecord
from workers.console.settings import ConsoleSettings
from workers.kafka.topics import read_records

log = structlog.get_logger(__name__)
MAX_LISTED = 500


@dataclass
class ReplaySummary:
    replay_id: str
    total: int = 0
    changed: int = 0
    missing_original: int = 0
    first: datetime | None = None
    last: datetime | None = None
    engines: Counter[str] = field(default_factory=Counter)
    change_kinds: Counter[str] = field(default_factory=Counter)
    flips: Counter[tuple[str, str]] = field(default_factory=Counter)
    changed_records: list[AuditRecord] = field(default_factory=list)

    def add(self, rec: AuditRecord) -> None:
        self.total += 1
        self.first = min(self.first or rec.replayed_at, rec.replayed_at)
        self.last = max(self.last or rec.replayed_at, rec.replayed_at)
        self.engines[f"{rec.replayed.engine} {rec.replayed.model_version} {rec.replayed.policy_version}"] += 1
        if rec.original is None:
            self.missing_original += 1
        if rec.changed:
            self.changed += 1
            self.change_kinds.update(rec.changes)
            if len(self.changed_records) < MAX_LISTED:
                self.changed_records.append(rec)
        self.flips[(rec.original.label if rec.original else "none", rec.replayed.label)] += 1

    @property
    def matrix(self) -> tuple[list[str], list[str]]:
        return sorted({a for a, _ in self.flips}), sorted({b for _, b in self.flips})


class AuditView:
    """Reads the audit topic at most every ``ttl_s`` seconds (a topic scan)."""

    def __init__(self, settings: ConsoleSettings, ttl_s: float = 15.0, read_timeout_s: float = 10.0) -> None:
        self.s = settings
        self.ttl_s = ttl_s
        self.read_timeout_s = read_timeout_s
        self._lock = threading.Lock()
        self._at = 0.0
        self._replays: dict[str, ReplaySummary] = {}

    def _load(self) -> dict[str, ReplaySummary]:
        with self._lock:
            if time.monotonic() - self._at < self.ttl_s:
                return self._replays
            out: dict[str, ReplaySummary] = {}
            try:
                # the worker's TLS/SASL settings too: the audit topic lives on the same cluster
                records = read_records(
                    self.s.kafka.bootstrap_servers,
                    self.s.audit_topic,
                    timeout_s=self.read_timeout_s,
                    extra=self.s.kafka.extra,
                )
            except Exception as exc:
                log.warning("console_audits_unreadable", error=str(exc)[:200])
                records = []
            for r in records:
                try:
                    rec = AuditRecord.model_validate_json(r.value or b"")
                except ValueError:
                    continue
                out.setdefault(rec.replay_id, ReplaySummary(rec.replay_id)).add(rec)
            self._replays, self._at = out, time.monotonic()
            return out

    def replays(self) -> list[ReplaySummary]:
        return sorted(self._load().values(), key=lambda r: -r.last.timestamp() if r.last else 0.0)

    def replay(self, replay_id: str) -> ReplaySummary | None:
        return self._load().get(replay_id)
