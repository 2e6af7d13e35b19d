"""Topic creation: the worker, the console, redrive and the review ledger create the topics they own.

It lives here (not in ``infra.stack``) so that production code never imports the embedded local stack;
``infra.stack`` re-exports it for the CLI and the tests.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping

from schemas.errors import EXIT_CONFIG, EXIT_OUTAGE, FatalError


class TopicCreationError(FatalError):
    """A topic could not be created (other than because it already exists): the broker refused it (ACLs,
    a topic policy, a replication factor the cluster cannot meet). Found when a command starts, before
    anything is consumed; a refusal is not fixed by waiting: exit 2. (A broker that cannot be reached at
    all fails earlier, in ``list_topics``: ``KafkaException``, exit 3.)"""

    exit_code = EXIT_CONFIG


class TopicCreationTimeout(FatalError):
    """The broker did not finish creating a topic in time, or answered with a retriable error (a
    controller moving, a broker restarting): infrastructure, not configuration. Exit 3: run again."""

    exit_code = EXIT_OUTAGE


def creation_error(topic: str, exc: BaseException, timeout_s: float) -> FatalError:
    """What a failed topic creation means for the command: an outage (exit 3) or a refusal (exit 2)."""
    from confluent_kafka import KafkaException

    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    if isinstance(exc, TimeoutError | concurrent.futures.TimeoutError) or (
        err is not None and hasattr(err, "retriable") and err.retriable()
    ):
        return TopicCreationTimeout(
            f"topic {topic} was not created within {timeout_s:g}s ({exc or type(exc).__name__}); "
            "the broker is slow or restarting: run the command again"
        )
    return TopicCreationError(f"cannot create topic {topic}: {exc}")


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
                raise creation_error(name, exc, timeout_s) from exc
