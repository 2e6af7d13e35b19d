"""docker-compose.yml cannot run here (no Docker engine); check that it parses and is coherent."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from workers.console.settings import ConsoleSettings

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def test_compose_structure() -> None:
    doc = compose()
    services = doc["services"]
    assert {"kafka", "minio", "redis", "vllm", "worker", "console", "console-redis"} <= set(services)
    for name in ("kafka", "minio", "redis", "vllm", "console-redis"):
        assert "healthcheck" in services[name], name
    gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    env = services["worker"]["environment"]
    assert env["GUARDSTREAM_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["GUARDSTREAM_ENGINE"] in {"vllm-server", "vllm"}
    for svc in ("worker", "console"):
        for dep in services[svc]["depends_on"]:
            assert dep in services, (svc, dep)
    assert (ROOT / services["worker"]["build"]["dockerfile"]).is_file()


def _flags(command: list[str]) -> dict[str, str]:
    return {a.removeprefix("--"): b for a, b in zip(command[1::2], command[2::2], strict=True)}


def test_console_store_is_durable_and_apart_from_the_cache() -> None:
    services = compose()["services"]
    store, cache = _flags(services["console-redis"]["command"]), _flags(services["redis"]["command"])
    # AOF on and nothing evicted: queue items and claims survive a restart and memory pressure
    assert store["appendonly"] == "yes" and store["maxmemory-policy"] == "noeviction"
    assert cache["maxmemory-policy"] != "noeviction"  # the verdict cache may evict: not the console's store
    (volume,) = services["console-redis"]["volumes"]
    name, _, mount = volume.partition(":")
    assert mount == "/data" and name in compose()["volumes"]  # a named volume, its own
    assert name not in str(services["redis"].get("volumes", []))
    assert services["console"]["ports"] == ["127.0.0.1:8080:8080"]  # the host's loopback only
    assert "console-redis" in services["console"]["depends_on"]
    build = services["console"]["build"]  # the one Dockerfile, with the console extra on top
    assert build["dockerfile"] == "infra/Dockerfile" and build["args"]["EXTRAS"] == "console"
    dockerfile = (ROOT / build["dockerfile"]).read_text()
    assert "ARG EXTRAS" in dockerfile and '".[$EXTRAS]"' in dockerfile


def _interpolate(value: object) -> str:
    """Compose's ``${NAME:-default}`` with NAME unset on the host (the default applies)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def test_console_env_block_loads_into_console_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("GUARDSTREAM_"):
            monkeypatch.delenv(key)
    services = compose()["services"]
    for key, value in services["console"]["environment"].items():
        monkeypatch.setenv(key, _interpolate(value))
    s = ConsoleSettings()  # from the environment, as `guardstream console` in the container reads it
    assert s.store_url == "redis://console-redis:6379/0" and s.store_url != s.redis_url
    assert s.bootstrap_servers == services["worker"]["environment"]["GUARDSTREAM_BOOTSTRAP_SERVERS"]
    assert s.s3_endpoint_url == services["worker"]["environment"]["GUARDSTREAM_S3_ENDPOINT_URL"]
    assert s.allowed_buckets == ["guardstream-media"]
    # the container binds all its interfaces on the published port; no tokens: a one-time login URL
    assert (s.console_host, s.console_port) == ("0.0.0.0", 8080)
    published = services["console"]["ports"][0].rsplit(":", 1)[1]
    assert int(published) == s.console_port
    assert s.tokens == {} and not s.console_secret
    # the store URL names the compose service that is the durable Redis
    assert s.store_url.split("//")[1].split(":")[0] in services
    # locally (no compose), the store is still the cache Redis: nothing breaks for `guardstream up`/demo
    monkeypatch.delenv("GUARDSTREAM_CONSOLE_REDIS_URL")
    assert ConsoleSettings().store_url == ConsoleSettings().redis_url
