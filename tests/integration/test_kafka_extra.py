"""``kafka_extra`` reaches every client (issue 13, item 7).

The proof that a setting reached a client: told ``security.protocol=SSL``, a client pointed at the local
*plaintext* broker cannot read or write anything. Before, ``audit-export`` read every record over
plaintext when told SSL (the setting never reached its consumer).
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import faust
import pytest
from confluent_kafka import KafkaException

from infra.stack import create_topics
from schemas.events import AuditRecord, DecisionSummary, Modality, VerdictEvent
from tests.support import subprocess_env
from workers.console.audits import AuditView
from workers.console.settings import ConsoleSettings
from workers.kafka.admin import TopicCreationError
from workers.kafka.config import faust_broker_kwargs, reader_config, writer_config
from workers.kafka.topics import produce_all, read_records
from workers.settings import Settings

SSL = {"security.protocol": "SSL"}


def test_role_configs_carry_the_extra_settings() -> None:
    extra = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "client.id": "x"}
    for cfg in (reader_config("b:9092", extra), writer_config("b:9092", extra)):
        assert all(cfg[k] == v for k, v in extra.items())


def test_faust_gets_the_same_security_settings() -> None:
    assert faust_broker_kwargs({}) == {}
    creds = faust_broker_kwargs(
        {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-256",
            "sasl.username": "svc",
            "sasl.password": "pw",
        }
    )["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password, str(creds.mechanism.value)) == ("svc", "pw", "SCRAM-SHA-256")
    assert creds.ssl_context is not None
    assert isinstance(faust_broker_kwargs(SSL)["broker_credentials"], faust.SSLCredentials)
    with pytest.raises(ValueError, match=r"ssl\.keystore"):
        faust_broker_kwargs({"security.protocol": "SSL", "ssl.keystore.location": "/k.p12"})
    with pytest.raises(ValueError, match="GSSAPI"):
        faust_broker_kwargs({"security.protocol": "SASL_SSL", "sasl.mechanism": "GSSAPI"})


def _verdict(post_id: str) -> bytes:
    return (
        VerdictEvent(
            post_id=post_id,
            author_id="a",
            modality=Modality.TEXT,
            safe=True,
            engine="cpu",
            model_version="m",
            policy_version="p",
            content_hash="0" * 64,
            cache_hit=False,
            latency_ms=1.0,
            source_topic="posts",
            source_partition=0,
            source_offset=0,
            post_created_at=datetime.now(UTC),
        )
        .model_dump_json()
        .encode()
    )


def _seed(settings: Settings, n: int) -> None:
    values = [_verdict(f"p{i}") for i in range(n)]
    produce_all(settings.bootstrap_servers, settings.verdicts_topic, [(b"k", v) for v in values])


@pytest.mark.integration
def test_ssl_setting_reaches_readers_writers_and_admin(kafka_settings: Settings) -> None:
    _seed(kafka_settings, 5)
    assert (
        len(read_records(kafka_settings.bootstrap_servers, kafka_settings.verdicts_topic)) == 5
    )  # plaintext: reads
    with pytest.raises(KafkaException):
        read_records(kafka_settings.bootstrap_servers, kafka_settings.verdicts_topic, timeout_s=3, extra=SSL)
    quick = {**SSL, "message.timeout.ms": "3000"}  # fail the produce in 3 s, not the default 30
    with pytest.raises(RuntimeError, match=r"produce to .* failed"):
        produce_all(
            kafka_settings.bootstrap_servers, kafka_settings.verdicts_topic, [(b"k", b"v")], extra=quick
        )
    with pytest.raises((KafkaException, TopicCreationError)):
        create_topics(kafka_settings.bootstrap_servers, {"never-created": 1}, timeout_s=3, extra=SSL)


@pytest.mark.integration
def test_audit_export_cli_honours_kafka_extra(kafka_settings: Settings, tmp_path: Path) -> None:
    _seed(kafka_settings, 4)
    env = subprocess_env(kafka_settings, GUARDSTREAM_LOG_FORMAT="json")
    ok = tmp_path / "plain.jsonl"
    cmd = [sys.executable, "-m", "workers.cli", "audit-export", "--out"]
    r = subprocess.run([*cmd, str(ok)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(ok.read_text().splitlines()) == 4
    bad = tmp_path / "ssl.jsonl"
    env["GUARDSTREAM_KAFKA_EXTRA"] = json.dumps(SSL)
    r = subprocess.run([*cmd, str(bad)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0  # the SSL setting reached its consumer: nothing read over plaintext
    assert not bad.exists() or bad.read_text() == ""


@pytest.mark.integration
def test_console_audit_reader_honours_kafka_extra(kafka_settings: Settings) -> None:
    """The console's audits page reads the audit topic with the settings' TLS/SASL options (it read over
    plaintext whatever they said)."""
    topic = kafka_settings.posts_topic + "-audit"
    create_topics(kafka_settings.bootstrap_servers, {topic: 1})
    decision = DecisionSummary(safe=True, engine="cpu", model_version="m", policy_version="p")
    rec = AuditRecord(
        replay_id="r1",
        post_id="p1",
        source_topic=kafka_settings.posts_topic,
        source_partition=0,
        source_offset=0,
        original=decision,
        replayed=decision,
        changed=False,
        changes=[],
    )
    produce_all(kafka_settings.bootstrap_servers, topic, [(b"r1:0:0", rec.model_dump_json().encode())])
    plain = ConsoleSettings(**{**kafka_settings.model_dump(), "audit_topic": topic})
    assert [r.replay_id for r in AuditView(plain, read_timeout_s=5).replays()] == ["r1"]  # plaintext: reads
    ssl = plain.model_copy(update={"kafka_extra": SSL})
    assert AuditView(ssl, read_timeout_s=3).replays() == []  # told SSL: nothing read over plaintext
