"""Online clustering of novel-risk descriptions and the alert rule (pure; the faust app is glue).

Each description's MiniLM embedding joins the nearest cluster whose centroid is within
``join_threshold`` cosine similarity, or starts a new one. Clusters keep a running centroid, counts per
tumbling window, a bounded sample of members (for the medoid and examples), the ids of its most recent
members (bounded, ``MAX_RECENT_IDS``: what an alert names for review), distinct authors (bounded) and
modalities. A cluster alerts when its current window holds at least ``min_count`` posts from at
least ``min_authors`` distinct authors and has grown ``min_growth`` times over its trailing baseline
(mean of the previous ``baseline_windows`` windows, floor 1). Alerts are deduplicated: after alerting at
count c, the next alert needs ``escalation_factor`` × c (an escalation, level + 1).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from schemas.events import AlertEvent, WindowCount

if TYPE_CHECKING:
    from workers.settings import Settings

MAX_MEMBERS = 20
MAX_AUTHORS = 2000
# An alert names the cluster's members so the review console can queue every one of them (not only the
# examples). Bounded: a cluster's state is one changelog record, and an alert one Kafka message (500 ids
# of ~40 bytes is ~20 KB). A cluster that outgrows it is named by its most recent members.
MAX_RECENT_IDS = 500


@dataclass(frozen=True)
class ClusterConfig:
    join_threshold: float = 0.45
    merge_threshold: float = 0.8
    window_s: int = 3600
    keep_windows: int = 48
    baseline_windows: int = 24
    min_count: int = 20
    min_authors: int = 5
    min_growth: float = 3.0
    escalation_factor: float = 2.0
    examples: int = 5

    @classmethod
    def from_settings(cls, s: Settings) -> ClusterConfig:
        """The ``GUARDSTREAM_ALERT_*`` settings (``Settings.alerts``; the settings know nothing of the
        alerts app)."""
        a = s.alerts
        return cls(
            join_threshold=a.join_threshold,
            merge_threshold=a.merge_threshold,
            window_s=a.window_s,
            min_count=a.min_count,
            min_authors=a.min_authors,
            min_growth=a.min_growth,
        )


@dataclass
class Cluster:
    cluster_id: str
    centroid: list[float]
    size: int = 0
    windows: dict[int, int] = field(default_factory=dict)  # window start (epoch s) -> count
    members: list[dict[str, Any]] = field(default_factory=list)  # {post_id, text, vec}
    # [ts, post_id] of the most recent MAX_RECENT_IDS members, oldest first (a state written before this
    # field existed reads as empty and fills up from the next member on)
    recent: list[list[Any]] = field(default_factory=list)
    authors: list[str] = field(default_factory=list)
    modalities: dict[str, int] = field(default_factory=dict)
    first_seen: float = 0.0
    last_seen: float = 0.0
    alerted_count: int = 0
    level: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "windows": {str(k): v for k, v in self.windows.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cluster:
        return cls(**{**d, "windows": {int(k): v for k, v in d["windows"].items()}})

    def medoid(self) -> str:
        if not self.members:
            return ""
        vecs = np.array([m["vec"] for m in self.members], dtype=np.float32)
        return str(self.members[int((vecs @ vecs.T).sum(axis=1).argmax())]["text"])


def nearest(clusters: dict[str, Cluster], vec: np.ndarray[Any, Any]) -> tuple[str | None, float]:
    best, best_sim = None, -1.0
    for cid, c in clusters.items():
        sim = float(np.dot(vec, np.asarray(c.centroid, dtype=np.float32)))
        if sim > best_sim:
            best, best_sim = cid, sim
    return best, best_sim


def add(
    clusters: dict[str, Cluster],
    cfg: ClusterConfig,
    vec: np.ndarray[Any, Any],
    *,
    post_id: str,
    text: str,
    author: str,
    modality: str,
    ts: float,
) -> Cluster:
    cid, sim = nearest(clusters, vec)
    if cid is None or sim < cfg.join_threshold:
        cid = uuid.uuid4().hex[:12]
        clusters[cid] = Cluster(cid, [float(x) for x in vec], first_seen=ts, last_seen=ts)
    c = clusters[cid]
    cen = (np.asarray(c.centroid, dtype=np.float32) * c.size + vec) / (c.size + 1)
    c.centroid = [float(x) for x in cen / (np.linalg.norm(cen) or 1.0)]
    c.size += 1
    w = int(ts // cfg.window_s) * cfg.window_s
    c.windows[w] = c.windows.get(w, 0) + 1
    for old in sorted(c.windows)[: max(0, len(c.windows) - cfg.keep_windows)]:
        del c.windows[old]
    if len(c.members) < MAX_MEMBERS:
        c.members.append({"post_id": post_id, "text": text, "vec": [round(float(x), 4) for x in vec]})
    c.recent = _newest([*c.recent, [ts, post_id]])
    if author not in c.authors and len(c.authors) < MAX_AUTHORS:
        c.authors.append(author)
    c.modalities[modality] = c.modalities.get(modality, 0) + 1
    c.first_seen = min(c.first_seen or ts, ts)
    c.last_seen = max(c.last_seen, ts)
    return c


def _newest(recent: list[list[Any]]) -> list[list[Any]]:
    """The ``MAX_RECENT_IDS`` most recent [ts, post_id] pairs, oldest first (stable for equal times)."""
    return sorted(recent, key=lambda r: float(r[0]))[-MAX_RECENT_IDS:]


def merge_near_duplicates(clusters: dict[str, Cluster], cfg: ClusterConfig) -> list[tuple[str, str]]:
    """Fold clusters whose centroids are within ``merge_threshold`` into the larger one."""
    merged: list[tuple[str, str]] = []
    ids = sorted(clusters, key=lambda i: -clusters[i].size)
    for i, a in enumerate(ids):
        if a not in clusters:
            continue
        for b in ids[i + 1 :]:
            if b not in clusters:
                continue
            ca, cb = clusters[a], clusters[b]
            if float(np.dot(ca.centroid, cb.centroid)) < cfg.merge_threshold:
                continue
            cen = np.asarray(ca.centroid) * ca.size + np.asarray(cb.centroid) * cb.size
            ca.centroid = [float(x) for x in cen / (np.linalg.norm(cen) or 1.0)]
            ca.size += cb.size
            for w, n in cb.windows.items():
                ca.windows[w] = ca.windows.get(w, 0) + n
            ca.members = (ca.members + cb.members)[:MAX_MEMBERS]
            ca.recent = _newest(ca.recent + cb.recent)
            ca.authors = list(dict.fromkeys(ca.authors + cb.authors))[:MAX_AUTHORS]
            for m, n in cb.modalities.items():
                ca.modalities[m] = ca.modalities.get(m, 0) + n
            ca.first_seen, ca.last_seen = min(ca.first_seen, cb.first_seen), max(ca.last_seen, cb.last_seen)
            del clusters[b]
            merged.append((b, a))
    return merged


def window_authors(c: Cluster) -> int:
    return len(c.authors)


def check_alert(c: Cluster, cfg: ClusterConfig, now_ts: float) -> AlertEvent | None:
    w = int(now_ts // cfg.window_s) * cfg.window_s
    current = c.windows.get(w, 0)
    prev = [c.windows.get(w - k * cfg.window_s, 0) for k in range(1, cfg.baseline_windows + 1)]
    baseline = max(sum(prev) / len(prev), 1.0)
    growth = current / baseline
    if current < cfg.min_count or len(c.authors) < cfg.min_authors or growth < cfg.min_growth:
        return None
    if c.alerted_count and current < c.alerted_count * cfg.escalation_factor:
        return None  # already alerted at this level
    c.alerted_count = current
    c.level += 1
    ex = c.members[: cfg.examples]
    return AlertEvent(
        alert_id=f"{c.cluster_id}-{c.level}",
        cluster_id=c.cluster_id,
        representative=c.medoid(),
        examples=[m["post_id"] for m in ex],
        example_descriptions=[m["text"] for m in ex],
        member_ids=[str(pid) for _, pid in c.recent],
        size=c.size,
        counts_per_window=[
            WindowCount(window_start=datetime.fromtimestamp(k, UTC), count=v)
            for k, v in sorted(c.windows.items())
        ],
        window_seconds=cfg.window_s,
        growth=round(growth, 3),
        distinct_authors=len(c.authors),
        modalities=dict(c.modalities),
        first_seen=datetime.fromtimestamp(c.first_seen, UTC),
        last_seen=datetime.fromtimestamp(c.last_seen, UTC),
        level=c.level,
    )
