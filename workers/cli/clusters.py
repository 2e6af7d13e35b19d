"""``guardstream clusters``: the alerts app's current clusters."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from workers.cli.base import BootstrapOpt, app, load_settings
from workers.cli.render import clusters_table, terminal


@app.command()
def clusters(
    bootstrap_servers: BootstrapOpt = None,
    limit: Annotated[int, typer.Option(help="Show at most this many clusters (largest first).", min=1)] = 30,
) -> int:
    """Print the alerts app's current clusters (from its changelog)."""
    from workers.alerts.app import read_clusters
    from workers.alerts.clustering import ClusterConfig

    s = load_settings(bootstrap_servers=bootstrap_servers)
    cfg = ClusterConfig.from_settings(s)
    rows: list[dict[str, Any]] = []
    for c in sorted(read_clusters(s).values(), key=lambda c: -c.size)[:limit]:
        w = int(c.last_seen // cfg.window_s) * cfg.window_s
        prev = [c.windows.get(w - k * cfg.window_s, 0) for k in range(1, cfg.baseline_windows + 1)]
        rows.append(
            {
                "cluster_id": c.cluster_id,
                "label": c.medoid(),
                "size": c.size,
                "growth": c.windows.get(w, 0) / max(sum(prev) / len(prev), 1.0),
                "authors": len(c.authors),
                "last_seen": c.last_seen,
                "level": c.level,
            }
        )
    terminal(width=160).print(clusters_table(rows))
    return 0
