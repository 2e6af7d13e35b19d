"""Secrets never leak into logs (issue 13, item 5): URL masking, the structlog processor every log line
goes through, and ``guardstream up`` run for real with a planted Redis password."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
import structlog

from infra.stack import RedisServer, free_port
from workers.observability.logging import configure_logging
from workers.secrets import mask_url, mask_urls_in

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
