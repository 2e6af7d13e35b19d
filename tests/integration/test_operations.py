"""Operations: Prometheus metrics and health endpoints of a running worker; k8s manifests parse."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from confluent_kafka import TopicPartition

from guard.engines.cpu.engine import CpuEngine
from infra.stack import free_port
from tests.conftest import Services
from workers.demo.sample_feed import post
from workers.kafka.lag import LagReporter
from workers.kafka.topics import produce_all
from workers.observability.metrics import HEALTH, start_metrics_server
from workers.observability.sensors import PrometheusSensor, RecordingSensor
from workers.settings import Settings
from workers.testing import OutcomeRecorder
from workers.wiring import build_worker

ROOT = Path(__file__).resolve().parents[2]


def metric(text: str, name: str, labels: str = "") -> float:
    pat = re.compile(rf"^{re.escape(name)}{re.escape(labels)}\s+([0-9.e+-]+)$", re.MULTILINE)
    return sum(float(m) for m in pat.findall(text))


@pytest.mark.integration
def test_metrics_and_health_are_served(
    kafka_settings: Settings, services: Services, cpu_engine: CpuEngine
) -> None:
    port = free_port()
    server = start_metrics_server(port, host="127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    try:
        before = httpx.get(f"{base}/metrics").text
        produce_all(
            kafka_settings.bootstrap_servers,
            kafka_settings.posts_topic,
            [(None, post(f"m-{i}", "a", f"metrics post {i}")) for i in range(5)] + [(None, b"not json")],
        )
        ready_seen = threading.Event()

        def on_batch(_outs: object) -> None:
            if httpx.get(f"{base}/readyz").status_code == 200:
                ready_seen.set()

        build_worker(
            kafka_settings.model_copy(update={"lag_interval_s": 0.01}),
            cpu_engine,
            observers=[OutcomeRecorder(on_batch, keep=False)],
        ).run(until_drained=True)
        after = httpx.get(f"{base}/metrics").text
        assert ready_seen.is_set(), "readiness was not reported while partitions were assigned"
        assert httpx.get(f"{base}/healthz").status_code == 200
        stopped = httpx.get(f"{base}/readyz")
        assert stopped.status_code == 503 and not HEALTH.ready and "stopped" in stopped.text
        assert metric(after, "guardstream_consumed_total") - metric(before, "guardstream_consumed_total") == 6
        assert metric(after, "guardstream_dead_letters_total", '{error_code="invalid_json"}') >= 1
        assert metric(after, "guardstream_moderated_total", '{engine="cpu-minilm",outcome="safe"}') >= 5
        assert (
            metric(after, "guardstream_engine_latency_seconds_count")
            - metric(before, "guardstream_engine_latency_seconds_count")
            == 5
        )  # one engine request per post that reached the engine
        assert metric(after, "guardstream_commits_total") > metric(before, "guardstream_commits_total")
        assert "guardstream_consumer_lag{" in after
        assert "guardstream_e2e_latency_seconds_bucket" in after
    finally:
        server.shutdown()


def test_k8s_manifests() -> None:
    docs = [
        d for f in sorted((ROOT / "infra/k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d
    ]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "guardstream-worker") in kinds and ("ScaledObject", "guardstream-worker") in kinds
    assert ("ConfigMap", "guardstream-config") in kinds and ("Deployment", "proguard-vllm") in kinds
    vllm = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "proguard-vllm")
    spec = vllm["spec"]["template"]["spec"]
    assert spec["nodeSelector"] and spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    cfg = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    for key in cfg:  # every ConfigMap key is a real setting
        assert key.removeprefix("GUARDSTREAM_").lower() in Settings.model_fields, key
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    assert scaled["spec"]["triggers"][0]["type"] == "kafka"


@pytest.mark.integration
def test_a_member_without_partitions_is_idle_not_ready(
    kafka_settings: Settings, cpu_engine: CpuEngine
) -> None:
    """A worker holding no partitions answers 503 "idle" on /readyz (it is no serving capacity), and
    logs and reports it when the group has lag while it holds nothing -- once the group had its chance
    (a session timeout) to assign it partitions."""
    from structlog.testing import capture_logs

    port = free_port()
    server = start_metrics_server(port, host="127.0.0.1")
    produce_all(
        kafka_settings.bootstrap_servers, kafka_settings.posts_topic, [(None, post("idle-1", "a", "x"))]
    )
    # not subscribed: no partitions (session_timeout 1 s: past it, an idle member is worth reporting)
    worker = build_worker(kafka_settings.model_copy(update={"session_timeout_ms": 1000}), cpu_engine)
    try:
        assert worker.readiness() == (False, "idle: no partitions assigned")
        assert isinstance(worker.sensor, PrometheusSensor)  # what /readyz serves
        worker.sensor.on_ready(*worker.readiness())
        r = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert r.status_code == 503 and "idle: no partitions assigned" in r.text
        assert worker.lag.idle_after_s == 1.0

        now = [0.0]
        sensor = RecordingSensor()
        lag = LagReporter(
            worker.consumer,
            topic=kafka_settings.posts_topic,
            group_id=kafka_settings.group_id,
            idle_after_s=worker.lag.idle_after_s,
            sensor=sensor,
            clock=lambda: now[0],
        )
        lag.update()
        assert sensor.idle_with_lag == []  # the group has not had its chance yet
        now[0] = 2.0
        with capture_logs() as logs:
            lag.update()
        assert sensor.idle_with_lag == [True] and sensor.lag == []
        assert any(e["event"] == "member_idle_with_lag" and e["lag"] >= 1 for e in logs)
    finally:
        worker.close()
        server.shutdown()


@pytest.mark.integration
def test_lag_of_a_partition_read_to_the_end_is_zero_before_it_is_fetched(
    kafka_settings: Settings, cpu_engine: CpuEngine
) -> None:
    """Right after an assignment the position is unknown; the lag then comes from the committed offset
    (it used to count the whole partition as lag)."""
    produce_all(
        kafka_settings.bootstrap_servers,
        kafka_settings.posts_topic,
        [(f"k{i}", post(f"lag-{i}", "a", "x")) for i in range(9)],
    )
    build_worker(kafka_settings, cpu_engine).run(until_drained=True)  # everything consumed and committed
    sensor = RecordingSensor()
    reported: list[tuple[str, int, int]] = []
    worker: list[Any] = []

    def on_event(name: str, details: dict[str, Any]) -> None:
        if name == "assigned" and not reported:  # nothing fetched yet: every position is unknown
            seen = len(sensor.lag)
            worker[0].lag.update([TopicPartition(t, p) for t, p in details["partitions"]])
            reported.extend(sensor.lag[seen:])

    worker.append(build_worker(kafka_settings, cpu_engine, on_event=on_event, sensor=sensor))
    worker[0].run(until_drained=True)
    assert sorted(reported) == [(kafka_settings.posts_topic, p, 0) for p in range(3)]
    # the sensor was the worker's for the whole run: readiness went through it, not the global state
    assert (True, "ready") in sensor.ready and sensor.ready[-1] == (False, "stopped")
    assert sensor.beats > 0 and sensor.consumed == 0  # nothing left to read
