"""Operability: commands that fail loudly (exit code + one-line reason, never a traceback), schemas that
document themselves, and the local stack's signal and port handling."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from confluent_kafka import Producer

from guard.engines.cpu.engine import CpuEngine
from infra.stack import LocalStack, create_topics, free_port
from schemas.events import json_schemas
from tests.conftest import Services
from workers.demo.sample_feed import post
from workers.kafka.config import base_config
from workers.kafka.topics import produce_all
from workers.observability.logging import KafkaLogRouter
from workers.settings import Settings, settings_environ
from workers.wiring import build_worker

ROOT = Path(__file__).resolve().parents[2]


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env={**os.environ, "GUARDSTREAM_LOG_FORMAT": "json", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def settings_env(s: Settings, reviews_topic: str) -> dict[str, str]:
    only = ("bootstrap_servers", "posts_topic", "verdicts_topic", "s3_endpoint_url")
    return {**settings_environ(s, only=only), "GUARDSTREAM_REVIEWS_TOPIC": reviews_topic}


def assert_one_line_error(p: subprocess.CompletedProcess[str], rc: int, *needles: str) -> None:
    assert p.returncode == rc, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr + p.stdout
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, p.stderr[-2000:]
    for n in needles:
        assert n in errors[0], errors[0]


# ---------------------------------------------------------------- item 8: exports that fail loudly
@pytest.mark.parametrize("fraction", ["2", "1", "-0.1", "nan"])
def test_export_rejects_a_validation_fraction_outside_0_1(fraction: str, tmp_path: Path) -> None:
    # nothing listens on this bootstrap: the value must be refused before any topic is read
    p = cli(
        "export-training",
        "--bootstrap-servers",
        "127.0.0.1:1",
        "--out",
        str(tmp_path / "x"),
        "--val-fraction",
        fraction,
        timeout=60,
    )
    assert_one_line_error(p, 2, "validation fraction", "--val-fraction")
    assert not (tmp_path / "x").exists()


def test_export_rejects_bad_ratios(tmp_path: Path) -> None:
    p = cli(
        "export-training", "--bootstrap-servers", "127.0.0.1:1", "--out", str(tmp_path), "--ratios", "1:1"
    )
    assert_one_line_error(p, 2, "ratios")


@pytest.mark.integration
def test_export_of_an_empty_range_fails_with_the_reason(kafka_settings: Settings, tmp_path: Path) -> None:
    reviews = kafka_settings.posts_topic + "-reviews"
    create_topics(kafka_settings.bootstrap_servers, {reviews: 1})
    out = tmp_path / "empty"
    p = cli("export-training", "--out", str(out), env=settings_env(kafka_settings, reviews))
    assert_one_line_error(p, 1, "no posts")
    assert not (out / "train.jsonl").exists() and not (out / "README.md").exists()


@pytest.mark.integration
def test_export_whose_ratios_select_nothing_names_the_fix(
    kafka_settings: Settings, services: Services, cpu_engine: CpuEngine, tmp_path: Path
) -> None:
    reviews = kafka_settings.posts_topic + "-reviews"
    create_topics(kafka_settings.bootstrap_servers, {reviews: 1})
    produce_all(
        kafka_settings.bootstrap_servers,
        kafka_settings.posts_topic,
        [(f"e{i}".encode(), post(f"e{i}", "a", f"garden party number {i}")) for i in range(4)],
    )
    build_worker(kafka_settings, cpu_engine).run(until_drained=True)
    env = settings_env(kafka_settings, reviews)
    # text only, default ratios 1:1:1 -> the balance selects 0 records
    p = cli("export-training", "--out", str(tmp_path / "a"), env=env)
    assert_one_line_error(p, 1, "select 0 records", "--ratios text=1")
    # the fix it names works (and proves the failure above was the ratios, not the data)
    ok = cli("export-training", "--out", str(tmp_path / "b"), "--ratios", "text=1", env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len((tmp_path / "b" / "train.jsonl").read_text().splitlines()) == 3


def test_launcher_dry_run_over_an_empty_dataset_fails(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("")
    p = subprocess.run(
        [sys.executable, "-m", "training.launch", "--dataset-dir", str(tmp_path), "--dry-run", "--no-trl"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert p.returncode == 1, p.stdout + p.stderr
    assert "no training records" in p.stdout and "Traceback" not in p.stderr


def test_every_json_schema_field_has_a_description() -> None:
    missing: list[str] = []

    def walk(schema: dict[str, Any], where: str) -> None:
        for name, prop in schema.get("properties", {}).items():
            if not str(prop.get("description", "")).strip():
                missing.append(f"{where}.{name}")
        for name, sub in schema.get("$defs", {}).items():
            walk(sub, f"{where}/{name}")

    schemas = json_schemas()
    for name, schema in schemas.items():
        walk(schema, name)
    assert not missing, f"fields without a description: {missing}"
    # and the shipped files carry them too (they are regenerated from the models)
    assert (
        '"description": "Stable reason code' in (ROOT / "schemas/json/dead_letter_event.v1.json").read_text()
    )


# ---------------------------------------------------------------- item 5: local stack hygiene
class CountingRouter(KafkaLogRouter):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.calls = 0

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        self.calls += 1
        super().log(level, msg, *args, **kwargs)


def test_kafka_log_router_rate_limits_each_line() -> None:
    now = [0.0]
    router = KafkaLogRouter(burst=2, every_s=10.0, clock=lambda: now[0])
    with structlog.testing.capture_logs() as logs:
        for i in range(500):  # the same line with changing numbers, as librdkafka repeats it
            router.log(
                logging.ERROR,
                "%s [%s] %s",
                "FAIL",
                "rdkafka#consumer-1",
                f"Connect to 127.0.0.1:{9000 + i} failed",
            )
        router.log(logging.WARNING, "%s [%s] %s", "REQTMOUT", "rdkafka#producer-2", "Timed out 1 requests")
        now[0] = 10.0
        router.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "Connect to 127.0.0.1:1 failed")
    fail = [e for e in logs if e["facility"] == "FAIL"]
    assert len(fail) == 3 and all(e["event"] == "librdkafka" and e["log_level"] == "error" for e in fail)
    assert "suppressed_since_last" not in fail[0] and fail[2]["suppressed_since_last"] == 498
    assert [e["message"] for e in logs if e["facility"] == "REQTMOUT"] == ["Timed out 1 requests"]


def test_librdkafka_lines_of_a_wrong_bootstrap_are_routed_and_rate_limited() -> None:
    router = CountingRouter(burst=2, every_s=60.0)
    cfg = {**base_config(f"127.0.0.1:{free_port()}"), "logger": router}  # nothing listens there
    cfg.update({"reconnect.backoff.ms": 1, "reconnect.backoff.max.ms": 5})
    p = Producer(cfg)
    with structlog.testing.capture_logs() as logs:
        # a bound on waiting, not a timing assertion: the loop ends as soon as 40 lines arrived (a loaded
        # CI machine once took 30 s for 37 of them)
        deadline = time.monotonic() + 120
        while router.calls < 40 and time.monotonic() < deadline:
            p.poll(0.1)  # librdkafka's log lines are served from poll()
    emitted = [e for e in logs if e["event"] == "librdkafka"]
    assert router.calls >= 40, router.calls
    assert emitted and len(emitted) <= 2 * len({(e["facility"], e["message"].split(":")[0]) for e in emitted})
    assert len(emitted) < router.calls / 4
    assert all(e["client"].startswith("rdkafka#producer") for e in emitted)


def wait_for_event(proc: subprocess.Popen[str], event: str, lines: list[str]) -> dict[str, Any] | None:
    assert proc.stderr is not None
    for line in proc.stderr:  # blocks until the process logs something or exits
        lines.append(line)
        if line.startswith("{") and json.loads(line).get("event") == event:
            return dict(json.loads(line))
    return None


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.integration
def test_sigterm_on_up_stops_the_broker_and_a_second_up_on_its_port_fails(services: Services) -> None:
    broker, s3 = free_port(), free_port()
    argv = [sys.executable, "-m", "workers.cli", "up", "--broker-port", str(broker), "--s3-port", str(s3)]
    argv += ["--redis-url", services.redis_url]  # our Redis: `up` must not start one on 6379
    env = {**os.environ, "GUARDSTREAM_LOG_FORMAT": "json"}
    up = subprocess.Popen(
        argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT
    )
    lines: list[str] = []
    try:
        ready = wait_for_event(up, "stack_up", lines)
        assert ready is not None, "".join(lines)[-3000:]
        assert ready["broker"] == f"127.0.0.1:{broker}" and port_open(broker) and port_open(s3)

        # a second stack on the same broker port: a clear error, not "success" on the other stack
        second = cli(
            "up",
            "--broker-port",
            str(broker),
            "--s3-port",
            str(free_port()),
            "--redis-url",
            services.redis_url,
        )
        assert_one_line_error(second, 1, f"port {broker}", "already in use", "--broker-port")
        assert up.poll() is None and port_open(broker)

        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
    assert not port_open(broker), "SIGTERM left the broker running"
    assert not port_open(s3)


@pytest.mark.integration
def test_local_stack_stops_the_redis_it_started_and_keeps_its_data(tmp_path: Path) -> None:
    port = free_port()

    def stack() -> LocalStack:
        return LocalStack(
            broker_port=free_port(),
            s3_port=free_port(),
            redis_url=f"redis://127.0.0.1:{port}/0",
            redis_data_dir=str(tmp_path / "redis"),
        )

    first = stack().start()
    try:
        assert first.redis is not None and first.redis.port == port and port_open(port)
        redis.Redis.from_url(first.redis.url).set("guardstream-test", "cached")
    finally:
        first.stop()
    assert not port_open(port), "the redis-server the stack started is still running"
    assert first.redis is None
    second = stack().start()  # the demo run twice: the cache is back, no process was left in between
    try:
        assert second.redis is not None
        assert redis.Redis.from_url(second.redis.url).get("guardstream-test") == b"cached"
    finally:
        second.stop()
    assert not port_open(port)


@pytest.mark.integration
def test_demo_output_is_not_interleaved_with_server_or_librdkafka_logs(services: Services) -> None:
    p = cli("demo", "--redis-url", services.redis_url, timeout=600, env={"GUARDSTREAM_LOG_FORMAT": "console"})
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert "verdicts (" in p.stdout and "dead letters (" in p.stdout
    both = p.stdout + p.stderr
    assert 'HTTP/1.1"' not in both, "moto/werkzeug access log in the demo output"
    assert not re.search(r"^%\d\|", both, re.MULTILINE), "raw librdkafka lines in the demo output"
