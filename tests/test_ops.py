"""Operability: commands that fail loudly (exit code + one-line reason, never a traceback), schemas that
document themselves, and the local stack's signal and port handling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from guard.cpu import CpuEngine
from infra.stack import create_topics
from schemas.events import json_schemas
from tests.conftest import Services
from workers.app import build_worker
from workers.sample_feed import post
from workers.settings import Settings
from workers.topics import produce_all

ROOT = Path(__file__).resolve().parents[1]


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
    return {
        "GUARDSTREAM_BOOTSTRAP_SERVERS": s.bootstrap_servers,
        "GUARDSTREAM_POSTS_TOPIC": s.posts_topic,
        "GUARDSTREAM_VERDICTS_TOPIC": s.verdicts_topic,
        "GUARDSTREAM_REVIEWS_TOPIC": reviews_topic,
        "GUARDSTREAM_S3_ENDPOINT_URL": s.s3_endpoint_url or "",
    }


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
def test_export_of_an_empty_range_fails_with_the_reason(settings: Settings, tmp_path: Path) -> None:
    reviews = settings.posts_topic + "-reviews"
    create_topics(settings.bootstrap_servers, {reviews: 1})
    out = tmp_path / "empty"
    p = cli("export-training", "--out", str(out), env=settings_env(settings, reviews))
    assert_one_line_error(p, 1, "no posts")
    assert not (out / "train.jsonl").exists() and not (out / "README.md").exists()


@pytest.mark.integration
def test_export_whose_ratios_select_nothing_names_the_fix(
    settings: Settings, services: Services, cpu_engine: CpuEngine, tmp_path: Path
) -> None:
    reviews = settings.posts_topic + "-reviews"
    create_topics(settings.bootstrap_servers, {reviews: 1})
    produce_all(
        settings.bootstrap_servers,
        settings.posts_topic,
        [(f"e{i}".encode(), post(f"e{i}", "a", f"garden party number {i}")) for i in range(4)],
    )
    build_worker(settings, cpu_engine).run(until_drained=True)
    env = settings_env(settings, reviews)
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
