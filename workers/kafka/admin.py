"""Topic creation: the worker, the console, redrive and the review ledger create the topics they own.

It lives here (not in ``infra.stack``) so that production code never imports the embedded local stack;
``infra.stack`` re-exports it for the CLI and the tests.
"""

from __future__ import annotations

from collections.abc import Mapping

from schemas.errors import EXIT_CONFIG, FatalError


class TopicCreationError(FatalError):
    """A topic could not be created (other than because it already exists): the broker refused it (ACLs,
    a topic policy, a replication factor the cluster cannot meet) or did not finish within ``timeout_s``.
    Found when a command starts, before anything is consumed; a refusal is not fixed by waiting: exit 2.
    (A broker that cannot be reached at all fails earlier, in ``list_topics``: ``KafkaException``, exit 3.)"""

    exit_code = EXIT_CONFIG


def create_topics(
    bootstrap: str,
    topics: dict[str, int],
    timeout_s: float = 15.0,
    extra: Mapping[str, str] | None = None,
) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from workers.kafka.config import admin_config  # the one place client security settings come from

    admin = AdminClient(admin_config(bootstrap, extra))
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    new = [NewTopic(t, n, 1) for t, n in topics.items() if t not in existing]
    if not new:
        return
    for name, fut in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            fut.result(timeout_s)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise TopicCreationError(f"cannot create topic {name}: {exc}") from exc
