"""Secrets never leak into logs (issue 13, item 5): URL masking, the structlog processor every log line
goes through, ``guardstream up`` run for real with a planted Redis password, and ``guardstream worker``
on a vllm-server whose URL carries a planted password (topics and logs)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import redis
import structlog

from infra.stack import RedisServer, free_port
from tests.support import subprocess_env
from workers.observability.logging import configure_logging
from workers.secrets import mask_url, mask_urls_in
from workers.settings import Settings

PLANTED = "pl4nted-s3cret-Zq9"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (f"redis://:{PLANTED}@10.0.0.5:6379/0", "redis://***@10.0.0.5:6379/0"),
        (f"rediss://default:{PLANTED}@cache:6380/1", "rediss://***@cache:6380/1"),
        (f"http://svc:{PLANTED}@gpu-pool:8003/v1", "http://***@gpu-pool:8003/v1"),
        (f"https://{PLANTED}@host/x", "https://***@host/x"),
        (
            f"https://s3/b/k?X-Amz-Signature={PLANTED}&partNumber=1",
            "https://s3/b/k?X-Amz-Signature=***&partNumber=1",
        ),
        ("http://127.0.0.1:8003/v1", "http://127.0.0.1:8003/v1"),
        ("s3://guardstream-media/a.png", "s3://guardstream-media/a.png"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert PLANTED not in mask_urls_in(f"failed: {url} (retrying)")


def test_every_log_line_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    saved = structlog.get_config()
    configure_logging("json", "INFO")  # binds the captured stderr: restored below
    try:
        log = structlog.get_logger("t")
        log.warning("redis_unavailable", error=f"Error connecting to redis://:{PLANTED}@h:6379/0", n=1)
        log.info("endpoints", urls=[f"http://u:{PLANTED}@a/v1", "http://b/v1"])
        try:
            raise ConnectionError(f"cannot reach http://u:{PLANTED}@gpu:8003/v1/models")
        except ConnectionError:
            log.exception("engine_probe_failed")
    finally:
        structlog.configure(**saved)
    err = capsys.readouterr().err
    assert PLANTED not in err
    lines = [json.loads(x) for x in err.strip().splitlines()]
    assert lines[0]["error"] == "Error connecting to redis://***@h:6379/0"
    assert lines[1]["urls"] == ["http://***@a/v1", "http://b/v1"]


@pytest.mark.integration
def test_guardstream_up_does_not_log_the_redis_password() -> None:
    server = RedisServer().start()
    proc: subprocess.Popen[str] | None = None
    try:
        redis.Redis.from_url(server.url).config_set("requirepass", PLANTED)  # our own server
        url = f"redis://:{PLANTED}@127.0.0.1:{server.port}/0"
        env = {**os.environ, "GUARDSTREAM_REDIS_URL": url, "GUARDSTREAM_LOG_FORMAT": "json"}
        cmd = [sys.executable, "-m", "workers.cli", "up", "--broker-port", str(free_port())]
        proc = subprocess.Popen(
            [*cmd, "--s3-port", str(free_port())],
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        deadline = time.monotonic() + 90
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if '"stack_up"' in line:
                break
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=60)
        text = "".join(lines) + rest + out
        (up,) = [json.loads(x) for x in lines if '"stack_up"' in x]
        assert up["redis"] == f"redis://***@127.0.0.1:{server.port}/0"
        assert PLANTED not in text
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        server.stop()


def _proguard_answer(body: dict[str, Any]) -> str:
    from guard.parser import format_output

    user = body["messages"][1]["content"][-1]["text"]
    if "challenge" in user:
        return format_output(unsafe=True, category="Dangerous Viral Breath Challenge", reasoning="new trend")
    if "garbled" in user:
        return "<think>\nthe model was cut off"
    return format_output(unsafe=False, reasoning="benign")


@pytest.mark.integration
def test_vllm_server_url_credentials_never_reach_a_topic_or_a_log(
    kafka_settings: Settings, services: Any
) -> None:
    """``guardstream worker`` on a vllm-server whose URL carries a planted password (userinfo), over a
    feed that reaches every output: a verdict, a novel risk (verdicts + novel-risks), an unparseable
    answer and a 400 (``engine_*`` dead letters with the server's text), malformed JSON, and a 503
    outage at the first request (the engine's failure and retry log lines, at DEBUG). The password is
    used (basic auth on the probe and on every completion) and appears in no record key or value of
    the three topics and in no line the worker wrote."""
    from tests.chat_server import ChatServer
    from workers.demo.sample_feed import post
    from workers.kafka.topics import produce_all, read_records

    server = ChatServer(
        _proguard_answer,
        outage_s=1.0,
        fail_if=lambda body: 400 if "too long" in body["messages"][1]["content"][-1]["text"] else None,
    ).start()
    feed = [
        post("s1", "a", "hello friends"),
        post("s2", "a", "try the blackout challenge tonight"),
        post("s3", "a", "garbled"),
        post("s4", "a", "this one is too long"),
        b"{not json",
    ]
    produce_all(kafka_settings.bootstrap_servers, kafka_settings.posts_topic, [(None, p) for p in feed])
    url = server.url.replace("http://", f"http://svc:{PLANTED}@")
    env = subprocess_env(
        kafka_settings,
        GUARDSTREAM_ENGINE="vllm-server",
        GUARDSTREAM_VLLM_SERVER_URL=url,
        GUARDSTREAM_LOG_FORMAT="json",
        GUARDSTREAM_LOG_LEVEL="DEBUG",
    )
    try:
        run = subprocess.run(
            [sys.executable, "-m", "workers.cli", "worker", "--until-drained"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        server.stop()
    logs = run.stdout + run.stderr
    assert run.returncode == 0, logs[-3000:]
    basic = "Basic " + base64.b64encode(f"svc:{PLANTED}".encode()).decode()
    assert server.get_headers and all(h.get("Authorization") == basic for h in server.get_headers)
    assert len(server.headers) > len(feed) and all(h.get("Authorization") == basic for h in server.headers)
    records = {
        t: read_records(kafka_settings.bootstrap_servers, t)
        for t in (kafka_settings.verdicts_topic, kafka_settings.novel_risk_topic, kafka_settings.dlq_topic)
    }
    values = {t: [json.loads(r.value or b"{}") for r in rs] for t, rs in records.items()}
    assert sorted(v["post_id"] for v in values[kafka_settings.verdicts_topic]) == ["s1", "s2"]
    assert [v["post_id"] for v in values[kafka_settings.novel_risk_topic]] == ["s2"]
    codes = sorted(d["error_code"] for d in values[kafka_settings.dlq_topic])
    assert codes == ["engine_failed", "engine_output_unparseable", "invalid_json"], codes
    assert all(server.url in v["model_version"] for v in values[kafka_settings.verdicts_topic])
    for rs in records.values():
        for r in rs:
            assert PLANTED.encode() not in (r.key or b"") + (r.value or b"")
    assert '"vllm server failing"' in logs and "chat completion retry" in logs  # the outage was logged
    assert PLANTED not in logs and base64.b64encode(f"svc:{PLANTED}".encode()).decode() not in logs
