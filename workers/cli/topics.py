"""``guardstream topics create``: the topic layout of the settings, created idempotently."""

from __future__ import annotations

from typing import Annotated

import typer

from workers.cli.base import BootstrapOpt, CliError, app, load_settings, log
from workers.cli.render import terminal, topics_table
from workers.settings import Settings

topics_app = typer.Typer(help="Kafka topics of the settings (posts, verdicts, novel-risks, DLQ, ...).")
app.add_typer(topics_app, name="topics")


def worker_topics(s: Settings, partitions: int = 3, side_partitions: int = 1) -> dict[str, int]:
    """The worker's topics and their partition counts: posts and verdicts carry the load (and share a
    count so a post's verdict keeps its partition); novel-risk and dead-letter topics are small."""
    return {
        s.kafka.posts_topic: partitions,
        s.kafka.verdicts_topic: partitions,
        s.kafka.novel_risk_topic: side_partitions,
        s.kafka.dlq_topic: side_partitions,
    }


def all_topics(s: Settings, partitions: int, side_partitions: int) -> dict[str, int]:
    """The worker's topics plus those of the review console/exports and the alerts app."""
    return {
        **worker_topics(s, partitions, side_partitions),
        s.kafka.reviews_topic: side_partitions,
        s.kafka.alerts_topic: side_partitions,
    }


def ensure_topics(
    s: Settings, wanted: dict[str, int], replication: int, timeout_s: float = 15.0
) -> tuple[dict[str, int], dict[str, int]]:
    """Create the topics that do not exist; returns (created, already there with their partitions)."""
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from workers.kafka.config import admin_config

    admin = AdminClient({"log_level": 2, **admin_config(s.kafka.bootstrap_servers, s.kafka.extra)})
    try:
        md = admin.list_topics(timeout=timeout_s)
    except Exception as exc:
        raise CliError(f"broker {s.kafka.bootstrap_servers} unreachable: {exc}") from None
    existing = {t: len(md.topics[t].partitions) for t in wanted if t in md.topics}
    new = [NewTopic(t, n, replication) for t, n in wanted.items() if t not in existing]
    created: dict[str, int] = {}
    for name, fut in (admin.create_topics(new, operation_timeout=timeout_s) if new else {}).items():
        try:
            fut.result(timeout_s)
            created[name] = wanted[name]
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):  # a concurrent init container won the race
                raise CliError(f"cannot create topic {name}: {exc}") from None
            existing[name] = wanted[name]
    return created, existing


@topics_app.command("create")
def create(
    bootstrap_servers: BootstrapOpt = None,
    partitions: Annotated[int, typer.Option(help="Partitions of the posts and verdicts topics.", min=1)] = 3,
    side_partitions: Annotated[
        int, typer.Option(help="Partitions of novel-risks, DLQ, reviews, alerts.", min=1)
    ] = 1,
    replication_factor: Annotated[
        int, typer.Option(help="Replicas per partition (3 on a production cluster).", min=1)
    ] = 1,
) -> int:
    """Create the topics the worker, console and alerts app use (existing ones are left as they are)."""
    s = load_settings(bootstrap_servers=bootstrap_servers)
    created, existing = ensure_topics(s, all_topics(s, partitions, side_partitions), replication_factor)
    terminal().print(topics_table(created, existing))
    log.info("topics_ready", created=sorted(created), existing=sorted(existing))
    return 0
