"""The one place that builds confluent-kafka client configs.

Every client the project makes (worker consumer and producer, replay, audit export, review, training
export, topic helpers, the alerts app) starts from ``base_config``, so ``kafka_extra`` (TLS, SASL,
client ids...) reaches all of them. Callers add only what is specific to their role.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workers.settings import Settings


def base_config(bootstrap: str, extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"bootstrap.servers": bootstrap, "log.connection.close": False}
    cfg.update(extra or {})
    return cfg


def consumer_config(s: Settings) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "bootstrap.servers": s.bootstrap_servers,
        "group.id": s.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": s.session_timeout_ms,
        "heartbeat.interval.ms": max(500, s.session_timeout_ms // 4),
        "isolation.level": "read_committed",
        "enable.partition.eof": True,  # tells --until-drained runs where each partition ends
        "partition.assignment.strategy": "range",
        "log.connection.close": False,
    }
    cfg.update(s.kafka_extra)
    return cfg


def producer_config(s: Settings) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "bootstrap.servers": s.bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        # every ack is reported: a record is complete when all its outputs are acknowledged
        "delivery.report.only.error": False,
        "message.timeout.ms": int(s.produce_timeout_s * 1000),
        "log.connection.close": False,
    }
    cfg.update(s.kafka_extra)
    return cfg
