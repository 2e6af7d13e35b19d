"""``guardstream alerts``: run the emerging-risk alerts app."""

from __future__ import annotations

from workers.cli.base import BootstrapOpt, app, load_settings


@app.command()
def alerts(bootstrap_servers: BootstrapOpt = None) -> int:
    """Run the emerging-risk alerts app (faust) over the novel-risk topic until SIGTERM."""
    from infra.stack import create_topics
    from workers.alerts.app import run_app

    s = load_settings(bootstrap_servers=bootstrap_servers)
    create_topics(
        s.kafka.bootstrap_servers, {s.kafka.novel_risk_topic: 1, s.kafka.alerts_topic: 1}, extra=s.kafka.extra
    )
    run_app(s)
    return 0
