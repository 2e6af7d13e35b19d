"""Pre-flight checks (issue 13, item 4) against the real broker, S3 server and Redis, and a stand-in
``vllm serve`` models endpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from guard.engines import EngineKind
from guard.engines.cpu.engine import CpuEngine
from infra.stack import free_port
from tests.conftest import Services
from tests.support import subprocess_env
from workers.preflight import (
    PreflightError,
    check_broker,
    check_bucket,
    check_engine,
    check_redis,
    check_settings,
    load_settings,
    preflight,
)
from workers.settings import Settings

pytestmark = pytest.mark.integration


def test_everything_reachable_passes(kafka_settings: Settings, cpu_engine: CpuEngine) -> None:
    results = preflight(kafka_settings, engine=cpu_engine)
    assert [r.name for r in results] == ["settings", "broker", "bucket", "redis", "engine"]
    assert all(r.ok for r in results), [r.line() for r in results]
    assert "probe judged" in results[-1].detail  # a real probe: the engine judged one text


def test_each_dependency_failure_names_its_fix(kafka_settings: Settings) -> None:
    dead = f"127.0.0.1:{free_port()}"
    r = check_broker(kafka_settings.model_copy(update={"bootstrap_servers": dead}), timeout_s=2)
    assert not r.ok and "GUARDSTREAM_BOOTSTRAP_SERVERS" in (r.fix or "")
    r = check_broker(kafka_settings.model_copy(update={"dlq_topic": "no-such-topic-xyz"}))
    assert not r.ok and "no-such-topic-xyz" in r.detail and r.fix
    r = check_bucket(kafka_settings.model_copy(update={"allowed_buckets": ["nobody-made-this-bucket"]}))
    assert not r.ok and "NoSuchBucket" in r.detail and "create bucket" in (r.fix or "")
    r = check_redis(kafka_settings.model_copy(update={"redis_url": f"redis://:pw@127.0.0.1:{free_port()}/0"}))
    assert not r.ok and "GUARDSTREAM_REDIS_URL" in (r.fix or "") and ":pw@" not in r.line()
    assert check_redis(kafka_settings.model_copy(update={"cache_enabled": False})).ok
    with pytest.raises(PreflightError, match="FAIL broker"):
        preflight(kafka_settings.model_copy(update={"bootstrap_servers": dead}), probe_engine=False)


def test_settings_combinations() -> None:
    s = Settings(decode_budget_bytes=64 << 20, kafka_extra={"security.protocol": "SASL_SSL"})
    r = check_settings(s)
    assert not r.ok
    assert "GUARDSTREAM_DECODE_BUDGET_BYTES" in (r.fix or "") and "sasl.mechanism" in (r.fix or "")
    s2, r2 = load_settings(max_batch_size=0)
    assert s2 is None and not r2.ok and "GUARDSTREAM_MAX_BATCH_SIZE" in r2.detail


class _Models(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/v1/models":
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps({"object": "list", "data": [{"id": "ProGuard-7B", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        return


@pytest.fixture
def models_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_vllm_server_probe(models_server: str) -> None:
    base = Settings(engine=EngineKind.VLLM_SERVER, vllm_server_url=models_server)
    assert check_engine(base).ok
    wrong = check_engine(base.model_copy(update={"vllm_server_model": "other"}))
    assert not wrong.ok and "GUARDSTREAM_VLLM_SERVER_MODEL" in (wrong.fix or "")
    down = check_engine(
        base.model_copy(update={"vllm_server_url": f"http://u:s3cret@127.0.0.1:{free_port()}/v1"})
    )
    assert not down.ok and "s3cret" not in down.line()
    # down (maybe still loading its model) is an outage to ride out; a wrong model name is a setting
    assert down.transient and not wrong.transient
    refused = check_engine(base.model_copy(update={"vllm_server_url": models_server + "/nope"}))
    assert not refused.ok and not refused.transient and "GUARDSTREAM_VLLM_SERVER_URL" in (refused.fix or "")


def test_worker_refuses_a_server_that_does_not_serve_the_configured_model(
    kafka_settings: Settings, services: Services
) -> None:
    """The worker probes a vllm-server at start: one serving another model stops it with exit 2 and one
    line naming the setting, before it consumes anything (before, the first post found out, and every
    post was dead-lettered). The chat server would answer completions: none is ever asked for."""
    from tests.chat_server import ChatServer
    from workers.demo.sample_feed import post
    from workers.kafka.topics import produce_all

    produce_all(
        kafka_settings.bootstrap_servers, kafka_settings.posts_topic, [(None, post("p1", "a", "hello"))]
    )
    server = ChatServer(lambda body: "unused", served_models=["Qwen2.5-VL-7B-Instruct"]).start()
    try:
        env = subprocess_env(
            kafka_settings,
            GUARDSTREAM_ENGINE="vllm-server",
            GUARDSTREAM_VLLM_SERVER_URL=server.url,
            GUARDSTREAM_VLLM_SERVER_MODEL="ProGuard-7B",
            GUARDSTREAM_LOG_FORMAT="json",
        )
        r = subprocess.run(
            [sys.executable, "-m", "workers.cli", "worker", "--until-drained"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.stop()
    assert r.returncode == 2, r.stderr[-2000:]
    named = [line for line in r.stderr.splitlines() if "GUARDSTREAM_VLLM_SERVER_MODEL" in line]
    assert len(named) == 1 and named[0].startswith("FAIL engine"), r.stderr[-2000:]
    assert "Qwen2.5-VL-7B-Instruct" in named[0] and "'ProGuard-7B'" in named[0]
    assert len(server.get_headers) == 1 and server.requests == [] and server.headers == []
    # nothing consumed: the group never committed an offset
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": kafka_settings.bootstrap_servers, "group.id": kafka_settings.group_id})
    try:
        parts = [TopicPartition(kafka_settings.posts_topic, p) for p in range(3)]
        assert all(tp.offset < 0 for tp in c.committed(parts, timeout=10))
    finally:
        c.close()


def test_check_cli(kafka_settings: Settings, services: Services) -> None:
    env = subprocess_env(kafka_settings)
    cmd = [sys.executable, "-m", "workers.cli", "check"]
    ok = subprocess.run([*cmd, "--skip-engine"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr[-2000:]
    assert [line.split()[:2] for line in ok.stdout.splitlines()] == [
        ["ok", "settings"],
        ["ok", "broker"],
        ["ok", "bucket"],
        ["ok", "redis"],
    ]
    bad_env = {**env, "GUARDSTREAM_MAX_BATCH_SIZE": "0"}
    bad = subprocess.run([*cmd, "--settings-only"], env=bad_env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "GUARDSTREAM_MAX_BATCH_SIZE" in bad.stdout and "fix:" in bad.stdout
    worker = subprocess.run(
        [sys.executable, "-m", "workers.cli", "worker"],
        env=bad_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 2 and "GUARDSTREAM_MAX_BATCH_SIZE" in worker.stderr
    # the worker runs the same checks at start: a posts topic that does not exist stops it with the fix
    # named, before any engine is loaded (waiting would not make the topic appear)
    no_topic = {**env, "GUARDSTREAM_POSTS_TOPIC": f"{kafka_settings.posts_topic}-missing"}
    missing = subprocess.run(
        [sys.executable, "-m", "workers.cli", "worker", "--until-drained"],
        env=no_topic,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert "FAIL broker" in missing.stderr and "fix:" in missing.stderr
    assert "preflight_failed" in missing.stderr
