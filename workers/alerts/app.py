"""Emerging-risk cluster alerts: a faust-streaming app over the novel-risk topic.

Every verdict with a novel-risk description (or unsafe without a taxonomy category) is embedded with the
shipped MiniLM model (in batches) and assigned to an online cluster (``workers/alerts/clustering.py``).
Clusters live in a faust Table, changelogged to Kafka, so a restarted app recovers them. When a cluster
crosses the thresholds an ``AlertEvent`` goes to the alerts topic; re-alerts happen only on escalation.

Clustering is global state, so the app runs as one instance over a single-partition novel-risk topic
(the worker creates it with one partition); its throughput is the embedder's, hundreds per second.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import numpy as np
import structlog

from schemas.extras import MissingExtra

try:
    import faust
except ImportError as exc:  # one line naming `pip install 'guardstream[alerts]'`
    raise MissingExtra("alerts", "faust") from exc
from workers.alerts.changelog import TABLE
from workers.alerts.changelog import read_clusters as read_clusters  # re-exported (CLI, tests)
from workers.alerts.clustering import Cluster, ClusterConfig, add, check_alert, merge_near_duplicates
from workers.kafka.config import faust_broker_kwargs
from workers.settings import Settings

log = structlog.get_logger(__name__)
SEEN_TABLE = "seen-posts"


def describe(ev: dict[str, Any]) -> str | None:
    text = ev.get("novel_risk")
    if not text and ev.get("safe") is False and not ev.get("category"):
        text = "unsafe content outside the taxonomy"
    return " ".join(str(text).split())[:200] if text else None


def build_app(settings: Settings) -> faust.App:
    cfg = ClusterConfig.from_settings(settings)
    app = faust.App(
        settings.alerts.app_id,
        broker=f"kafka://{settings.kafka.bootstrap_servers}",
        store="memory://",
        web_enabled=False,
        topic_partitions=1,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.kafka.session_timeout_ms / 1000,
        broker_heartbeat_interval=max(settings.kafka.session_timeout_ms / 4000, 0.5),
        broker_rebalance_timeout=max(settings.kafka.session_timeout_ms / 1000, 10.0),
        **faust_broker_kwargs(settings.kafka.extra),  # the same TLS/SASL settings as every other client
    )
    source = app.topic(settings.kafka.novel_risk_topic, value_type=bytes, value_serializer="raw")
    alerts = app.topic(settings.kafka.alerts_topic, value_type=bytes, value_serializer="raw")
    # use_partitioner: writes happen after a batched take(), outside per-event iteration (1 partition)
    clusters = app.Table(TABLE, default=None, partitions=1, use_partitioner=True)
    # post_id -> event time: faust is at-least-once, so events re-read after a restart are skipped here
    seen = app.Table(SEEN_TABLE, default=None, partitions=1, use_partitioner=True)
    horizon_s = cfg.window_s * cfg.keep_windows
    state: dict[str, Any] = {}

    def embedder() -> Any:
        if "emb" not in state:
            from guard.embeddings import shared_embedder

            state["emb"] = shared_embedder()
        return state["emb"]

    @app.agent(source)
    async def cluster_novel_risks(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take(64, within=0.5):
            events = []
            batch_ids: set[str] = set()
            for raw in batch:
                try:
                    ev = json.loads(raw)
                except (ValueError, TypeError):
                    continue
                text = describe(ev)
                pid = ev.get("post_id")
                if text and pid and pid not in batch_ids and seen.get(pid) is None:
                    batch_ids.add(pid)
                    events.append((ev, text))
            if not events:
                continue
            vecs = embedder().encode([t for _, t in events])
            current = {cid: Cluster.from_dict(d) for cid, d in clusters.items() if d}
            touched: set[str] = set()
            now = 0.0
            for (ev, text), vec in zip(events, vecs, strict=True):
                ts = datetime.fromisoformat(ev["post_created_at"].replace("Z", "+00:00")).timestamp()
                now = max(now, ts)
                c = add(
                    current,
                    cfg,
                    np.asarray(vec),
                    post_id=ev["post_id"],
                    text=text,
                    author=ev.get("author_id", "?"),
                    modality=ev.get("modality", "?"),
                    ts=ts,
                )
                touched.add(c.cluster_id)
                seen[ev["post_id"]] = ts
            if len(seen) > 200_000:  # forget posts older than the clusters' window horizon
                for pid in [k for k, v in seen.items() if v is not None and v < now - horizon_s]:
                    seen.pop(pid, None)
            for gone, into in merge_near_duplicates(current, cfg):
                clusters.pop(gone, None)
                touched.discard(gone)
                touched.add(into)
                log.info("clusters_merged", merged=gone, into=into)
            for cid in touched:
                c = current[cid]
                alert = check_alert(c, cfg, now)
                clusters[cid] = c.to_dict()
                if alert is not None:
                    await alerts.send(key=cid.encode(), value=alert.model_dump_json().encode())
                    log.warning(
                        "emerging_risk_alert",
                        cluster_id=cid,
                        level=alert.level,
                        size=alert.size,
                        representative=alert.representative,
                        authors=alert.distinct_authors,
                    )

    return app


def run_app(settings: Settings) -> None:
    app = build_app(settings)
    app.finalize()
    worker = faust.Worker(app, loglevel="WARNING", quiet=True)
    worker.execute_from_commandline()
