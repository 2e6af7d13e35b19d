"""The alerts app's cluster state read back from its table's changelog topic (no faust needed, so the
review console and ``guardstream clusters`` run without the ``alerts`` extra)."""

from __future__ import annotations

import json

from workers.alerts.clustering import Cluster
from workers.kafka.topics import read_records
from workers.settings import Settings

TABLE = "clusters"


def read_clusters(settings: Settings) -> dict[str, Cluster]:
    """The app's current clusters, rebuilt from the table's changelog topic (latest value per key)."""
    out: dict[str, Cluster] = {}
    topic = f"{settings.alerts.app_id}-{TABLE}-changelog"
    for r in read_records(settings.kafka.bootstrap_servers, topic, extra=settings.kafka.extra):
        if r.key is None:
            continue
        cid = json.loads(r.key)
        val = json.loads(r.value) if r.value else None
        if val:
            out[cid] = Cluster.from_dict(val)
        else:
            out.pop(cid, None)
    return out
