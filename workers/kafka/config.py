"""The one place that builds confluent-kafka client configs.

Every client the project makes (worker consumer and producer, replay, audit export, review, training
export, topic helpers, the alerts app) starts from ``base_config``, so ``KafkaSettings.extra``
(``GUARDSTREAM_KAFKA_EXTRA``: TLS, SASL, client ids...) reaches all of them. Callers add only what is
specific to their role.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workers.observability.logging import kafka_logger
from workers.settings import KafkaSettings


def base_config(bootstrap: str, extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    # librdkafka's log lines through structlog, rate-limited (workers/observability/logging.py),
    # not raw on stderr
    cfg: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "log.connection.close": False,
        "logger": kafka_logger(),
    }
    cfg.update(extra or {})
    return cfg


def consumer_config(k: KafkaSettings) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "bootstrap.servers": k.bootstrap_servers,
        "group.id": k.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": k.session_timeout_ms,
        "heartbeat.interval.ms": max(500, k.session_timeout_ms // 4),
        "isolation.level": "read_committed",
        "enable.partition.eof": True,  # tells --until-drained runs where each partition ends
        "partition.assignment.strategy": "range",
        "log.connection.close": False,
        "logger": kafka_logger(),
    }
    cfg.update(k.extra)
    return cfg


def producer_config(k: KafkaSettings, transactional_id: str | None = None) -> dict[str, Any]:
    """The worker's producer; with ``transactional_id``, a transactional one (exactly-once), whose open
    transaction the broker aborts ``TRANSACTION_TIMEOUT_MS`` after its producer went silent."""
    cfg: dict[str, Any] = {
        "bootstrap.servers": k.bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        # every ack is reported: a record is complete when all its outputs are acknowledged
        "delivery.report.only.error": False,
        "message.timeout.ms": int(k.produce_timeout_s * 1000),
        "log.connection.close": False,
        "logger": kafka_logger(),
    }
    if transactional_id is not None:
        cfg["transactional.id"] = transactional_id
        cfg["transaction.timeout.ms"] = k.transaction_timeout_ms
    cfg.update(k.extra)
    return cfg


# ---------------------------------------------------------------------------------------------------
# Every other client: the same base (bootstrap + ``KafkaSettings.extra``) so TLS/SASL settings reach all
# of them.


def admin_config(bootstrap: str, extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Topic creation and metadata (``infra.stack.create_topics``, ``guardstream check``)."""
    return base_config(bootstrap, extra)


def reader_config(
    bootstrap: str,
    extra: Mapping[str, str] | None = None,
    *,
    group_id: str = "guardstream-reader-unused",
    read_committed: bool = True,
) -> dict[str, Any]:
    """A consumer that reads by assignment (never joins ``group_id``; librdkafka requires one)."""
    cfg = base_config(bootstrap)
    cfg.update(
        {
            "group.id": group_id,
            "enable.auto.commit": False,
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        }
    )
    cfg.update(extra or {})
    return cfg


def writer_config(bootstrap: str, extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An idempotent producer acknowledged by all in-sync replicas (feeds, reviews, audit records)."""
    cfg = base_config(bootstrap)
    cfg.update({"enable.idempotence": True, "acks": "all", "linger.ms": 5})
    cfg.update(extra or {})
    return cfg


_FAUST_UNSUPPORTED = ("sasl.oauthbearer.", "sasl.kerberos.", "ssl.keystore.", "ssl.key.password")


def faust_broker_kwargs(extra: Mapping[str, str] | None) -> dict[str, Any]:
    """``KafkaSettings.extra`` (librdkafka names) as faust ``App`` keyword arguments (faust speaks aiokafka).

    Maps ``security.protocol`` SSL / SASL_PLAINTEXT / SASL_SSL, ``sasl.mechanism(s)`` PLAIN and
    SCRAM-SHA-256/512, ``sasl.username``/``sasl.password``, ``ssl.ca.location``,
    ``ssl.certificate.location``/``ssl.key.location`` and ``enable.ssl.certificate.verification``.
    Anything security-related it cannot map raises, naming the setting: the alerts app must not
    silently fall back to plaintext."""
    import ssl

    import faust

    extra = dict(extra or {})
    proto = extra.get("security.protocol", "PLAINTEXT").upper()
    unsupported = [k for k in extra if k.startswith(_FAUST_UNSUPPORTED)]
    if unsupported:
        raise ValueError(
            f"GUARDSTREAM_KAFKA_EXTRA keys {unsupported} cannot be passed to the faust alerts app; "
            "use PEM files (ssl.ca.location, ssl.certificate.location, ssl.key.location) and SASL PLAIN/SCRAM"
        )
    if proto == "PLAINTEXT":
        return {}
    ctx: ssl.SSLContext | None = None
    if proto in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=extra.get("ssl.ca.location"))
        if extra.get("ssl.certificate.location"):
            ctx.load_cert_chain(extra["ssl.certificate.location"], extra.get("ssl.key.location"))
        if extra.get("enable.ssl.certificate.verification", "true").lower() == "false":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    if proto == "SSL":
        return {"broker_credentials": faust.SSLCredentials(ctx)}
    if proto in ("SASL_SSL", "SASL_PLAINTEXT"):
        mechanism = extra.get("sasl.mechanism", extra.get("sasl.mechanisms", "PLAIN")).upper()
        if mechanism not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise ValueError(f"sasl.mechanism {mechanism!r}: the alerts app supports PLAIN and SCRAM only")
        creds = faust.SASLCredentials(
            username=extra.get("sasl.username"),
            password=extra.get("sasl.password"),
            ssl_context=ctx,
            mechanism=mechanism,
        )
        return {"broker_credentials": creds}
    raise ValueError(f"security.protocol {proto!r} in GUARDSTREAM_KAFKA_EXTRA is not one Kafka knows")
