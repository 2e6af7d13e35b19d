"""docker-compose.yml cannot run here (no Docker engine); check that it parses and is coherent."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_structure() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"kafka", "minio", "redis", "vllm", "worker"} <= set(services)
    for name in ("kafka", "minio", "redis", "vllm"):
        assert "healthcheck" in services[name], name
    gpu = services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    env = services["worker"]["environment"]
    assert env["GUARDSTREAM_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["GUARDSTREAM_ENGINE"] in {"vllm-server", "vllm"}
    for dep in services["worker"]["depends_on"]:
        assert dep in services
    assert (ROOT / services["worker"]["build"]["dockerfile"]).is_file()
