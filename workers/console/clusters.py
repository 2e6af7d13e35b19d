"""The clusters page's data: alerted clusters (from the alerts topic, via the store) and the alerts
app's live clusters (its table changelog), with per-window counts drawn as a small SVG bar chart."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from workers.console.settings import ConsoleSettings

if TYPE_CHECKING:
    from workers.console.store import QueueStore

log = structlog.get_logger(__name__)
CHART_W, CHART_H, MAX_BARS = 360, 80, 24


@dataclass
class Bar:
    x: float
    y: float
    w: float
    h: float
    count: int
    label: str


@dataclass
class ClusterRow:
    cluster_id: str
    representative: str
    size: int
    authors: int
    last_seen: datetime | None
    level: int  # 0: not alerted
    growth: float | None
    members: list[str] = field(default_factory=list)
    descriptions: list[str] = field(default_factory=list)
    modalities: dict[str, int] = field(default_factory=dict)
    bars: list[Bar] = field(default_factory=list)
    queued: int = 0


def bars(counts: list[tuple[datetime, int]]) -> list[Bar]:
    counts = sorted(counts)[-MAX_BARS:]
    if not counts:
        return []
    top = max(max(n for _, n in counts), 1)
    w = CHART_W / MAX_BARS
    out = []
    for i, (t, n) in enumerate(counts):
        h = (CHART_H - 14) * n / top
        out.append(Bar(i * w + 1, CHART_H - 12 - h, w - 2, h, n, t.strftime("%m-%d %H:%M")))
    return out


class ClusterView:
    """Reads the changelog at most every ``ttl_s`` seconds (it is a topic scan)."""

    def __init__(self, settings: ConsoleSettings, ttl_s: float = 15.0) -> None:
        self.s = settings
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._at = 0.0
        self._live: dict[str, ClusterRow] = {}

    def _live_clusters(self) -> dict[str, ClusterRow]:
        with self._lock:
            if time.monotonic() - self._at < self.ttl_s:
                return self._live
            from workers.alerts.changelog import read_clusters  # no faust: the console runs without it

            out: dict[str, ClusterRow] = {}
            try:
                clusters = read_clusters(self.s)
            except Exception as exc:  # the page still shows alerted clusters without the app's state
                log.warning("console_clusters_unreadable", error=str(exc)[:200])
                clusters = {}
            for cid, c in clusters.items():
                out[cid] = ClusterRow(
                    cluster_id=cid,
                    representative=c.medoid(),
                    size=c.size,
                    authors=len(c.authors),
                    last_seen=datetime.fromtimestamp(c.last_seen, UTC) if c.last_seen else None,
                    level=c.level,
                    growth=None,
                    members=[str(m["post_id"]) for m in c.members],
                    descriptions=[str(m["text"]) for m in c.members[:5]],
                    modalities=dict(c.modalities),
                    bars=bars([(datetime.fromtimestamp(w, UTC), n) for w, n in c.windows.items()]),
                )
            self._live, self._at = out, time.monotonic()
            return out

    def rows(self, store: QueueStore) -> list[ClusterRow]:
        rows = dict(self._live_clusters())
        for cid, a in store.alerts().items():
            live = rows.get(cid)
            rows[cid] = ClusterRow(
                cluster_id=cid,
                representative=a.representative,
                size=max(a.size, live.size if live else 0),
                authors=max(a.distinct_authors, live.authors if live else 0),
                last_seen=a.last_seen,
                level=a.level,
                growth=a.growth,
                members=sorted({*a.examples, *(a.member_ids or []), *(live.members if live else [])}),
                descriptions=list(a.example_descriptions[:5]),
                modalities=dict(a.modalities),
                bars=live.bars if live else bars([(w.window_start, w.count) for w in a.counts_per_window]),
            )
        from workers.console.store import Filters

        for r in rows.values():
            if r.level:
                r.queued = store.page(Filters(cluster=r.cluster_id), limit=0)[1]
        return sorted(rows.values(), key=lambda r: (-r.level, -r.size))
