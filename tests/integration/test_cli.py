"""The command line (issue 17 items 1, 3, 4): one-line errors, help that names variables and defaults,
the settings file, deployments whose shipped values validate, and produce/tail/topics on the real
broker and S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from tests import support
from tests.conftest import BUCKET, Services
from workers.cli import main
from workers.cli.base import CliError, read_config_file
from workers.kafka.topics import read_topic
from workers.preflight import check_settings
from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "workers.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any GUARDSTREAM_* variable of the developer's shell, JSON logs, ``extra``."""
    return support.clean_env(**{"GUARDSTREAM_LOG_FORMAT": "json", **extra})


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main`` in-process configures structlog to print to the captured stderr, which pytest closes after
    the test: later tests in this process must log where they did before."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main`` in-process: (exit code, stdout, stderr) with a SystemExit message counted as stderr."""
    try:
        rc = main(argv)
        extra = ""
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
        extra = "" if isinstance(exc.code, int) or exc.code is None else str(exc.code)
    out, err = capsys.readouterr()
    return rc, out, err + extra


# ---- item 3: a CLI that guides ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragment", "code"),
    [
        (["replay", "--from", "yesterday"], "--from 'yesterday'", 2),
        (["audit-export", "--out", "{tmp}/a.jsonl", "--from", "yesterday"], "ISO-8601", 2),
        (["export-training", "--out", "{tmp}/x", "--ratios", "1:1"], "--ratios '1:1'", 2),
        (["export-training", "--out", "{tmp}/x", "--val-fraction", "2"], "--val-fraction", 2),
        (["worker", "--engine", "gpt"], "'gpt' is not one of", 2),
        (["demo", "--engine", "gpt"], "--engine", 2),
        (
            ["audit-export", "--out", "{tmp}/a.jsonl", "--from", "2026-02-01", "--to", "2026-01-01"],
            "is after",
            2,
        ),
        (["replay", "--from", "20", "--to", "10"], "is after", 2),
        (["audit-export", "--out", "{tmp}/file/a.jsonl"], "does not exist", 1),
        (["export-training", "--out", "{tmp}/file/sub"], "is a file", 1),
        (["audit-export", "--out", "{tmp}"], "is a directory", 2),
        (["worker", "--max-batch-size", "0"], "--max-batch-size", 2),
        (["tail", "everything"], "'everything' is not one of", 2),
        (["redrive", "--code", "no_such_code"], "unknown error code", 1),
        (["review", "p", "--reviewer", "r"], "--unsafe or --safe", 2),
        (["audit-export"], "Missing option '--out'", 2),
        (["produce", "--sample", "2", "{tmp}/posts.jsonl"], "not both", 2),
        (["no-such-command"], "No such command", 2),
        (["produce", "--sample", "99"], "the sample feed has", 2),
        (["--config", "{tmp}/nope.toml", "check"], "does not exist", 2),
    ],
)
def test_bad_values_are_one_line(
    argv: list[str], fragment: str, code: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 for a bad flag value or usage, 1 for a refused request (README "Configuration")."""
    (tmp_path / "file").write_text("a file, not a directory")
    rc, out, err = run_main([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == code, (rc, out, err)
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err + out


def test_bad_value_in_a_subprocess_has_no_traceback(tmp_path: Path) -> None:
    r = subprocess.run(
        [*CLI, "export-training", "--out", str(tmp_path / "x"), "--val-fraction", "2"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--val-fraction" in r.stderr


def test_unknown_variables_are_warned_about_with_the_closest_name(tmp_path: Path) -> None:
    # a typo in a variable name silently left the default in force; now it is named, and nothing fails
    env = clean_env(GUARDSTREAM_BOOTSTRAP_SERVER="kafka:9092", GUARDSTREAM_NO_SUCH_THING="1")
    r = subprocess.run(
        [*CLI, "check", "--settings-only"], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert (
        "GUARDSTREAM_BOOTSTRAP_SERVER is not a setting; did you mean GUARDSTREAM_BOOTSTRAP_SERVERS?"
        in r.stdout
    )
    assert "GUARDSTREAM_NO_SUCH_THING is not a setting; ignored" in r.stdout
    # every other command warns through the log, once per variable
    r = subprocess.run(
        [*CLI, "audit-export", "--out", str(tmp_path / "a.jsonl"), "--from", "yesterday"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    warned = [json.loads(x) for x in r.stderr.splitlines() if "unknown_setting_variable" in x]
    assert [w["variable"] for w in warned] == ["GUARDSTREAM_BOOTSTRAP_SERVER", "GUARDSTREAM_NO_SUCH_THING"]
    assert warned[0]["hint"] == "did you mean GUARDSTREAM_BOOTSTRAP_SERVERS?"
    # the settings file's own variable, the console's settings and the test knobs are known
    (tmp_path / "gs.toml").write_text('posts_topic = "posts"\n')
    known = clean_env(
        GUARDSTREAM_CONFIG=str(tmp_path / "gs.toml"),
        GUARDSTREAM_CONSOLE_PORT="8081",
        GUARDSTREAM_SCREENSHOTS="docs/screenshots",
    )
    r = subprocess.run(
        [*CLI, "check", "--settings-only"], env=known, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "not a setting" not in r.stdout + r.stderr, r.stdout


def test_help_names_default_and_variable(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    rc, out, _ = run_main(["worker", "--help"], capsys)
    assert rc == 0
    for text in ("GUARDSTREAM_BOOTSTRAP_SERVERS", "127.0.0.1:9092", "GUARDSTREAM_MAX_BATCH_SIZE", "32"):
        assert text in out, text
    rc, out, _ = run_main(["--help"], capsys)
    # every command the tests, docs and Makefile run is still there, plus the new ones
    for cmd in [
        "worker",
        "up",
        "demo",
        "replay",
        "audit-export",
        "review",
        "export-training",
        "alerts",
        "clusters",
        "check",
        "redrive",
        "console",
        "schemas",
        "produce",
        "tail",
        "topics",
    ]:
        assert f" {cmd} " in out, cmd
    assert "--install-completion" in out
    rc, out, _ = run_main(["--version"], capsys)
    assert rc == 0 and out.startswith("guardstream ")


def test_settings_file_toml_and_env(tmp_path: Path) -> None:
    toml = tmp_path / "guardstream.toml"
    toml.write_text(
        'bootstrap_servers = "kafka.example:9092"\nallowed_buckets = ["a", "b"]\nmax_batch_size = 0\n'
    )
    assert read_config_file(toml) == {
        "GUARDSTREAM_BOOTSTRAP_SERVERS": "kafka.example:9092",
        "GUARDSTREAM_ALLOWED_BUCKETS": '["a", "b"]',
        "GUARDSTREAM_MAX_BATCH_SIZE": "0",
    }
    dotenv = tmp_path / ".env"
    dotenv.write_text("GUARDSTREAM_ENGINE=vllm-server\nGUARDSTREAM_ALLOWED_BUCKETS=x,y\n")
    assert read_config_file(dotenv)["GUARDSTREAM_ALLOWED_BUCKETS"] == "x,y"
    typo = tmp_path / "typo.toml"
    typo.write_text('bootstrap_server = "x:1"\n')
    with pytest.raises(CliError, match="did you mean bootstrap_servers"):
        read_config_file(typo)
    check = [*CLI, "--config", str(toml), "check", "--settings-only"]
    bad = subprocess.run(check, env=clean_env(), capture_output=True, text=True, timeout=60)
    # the file applies (its invalid batch size is reported by name)...
    assert bad.returncode == 2 and "GUARDSTREAM_MAX_BATCH_SIZE" in bad.stdout, bad.stdout + bad.stderr
    # ...and the environment wins over it
    ok = subprocess.run(
        check, env=clean_env(GUARDSTREAM_MAX_BATCH_SIZE="8"), capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0 and ok.stdout.startswith("ok   settings"), ok.stdout + ok.stderr


# ---- item 1: deployments that start ---------------------------------------------------------------------


def deployment_env_blocks() -> dict[str, dict[str, str]]:
    """Every GUARDSTREAM_* env block the deployments ship: compose services and the k8s ConfigMap."""
    blocks: dict[str, dict[str, str]] = {}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        if any(k.startswith("GUARDSTREAM_") for k in env):
            blocks[f"compose:{name}"] = {k: str(v) for k, v in env.items()}
    for doc in yaml.safe_load_all((ROOT / "infra/k8s/configmap.yaml").read_text()):
        if doc and doc.get("kind") == "ConfigMap":
            blocks[f"k8s:{doc['metadata']['name']}"] = {k: str(v) for k, v in doc["data"].items()}
    return blocks


def test_deployments_have_env_blocks() -> None:
    blocks = deployment_env_blocks()
    assert {"compose:worker", "compose:topics-init", "k8s:guardstream-config"} <= set(blocks)
    assert blocks["k8s:guardstream-config"]["GUARDSTREAM_S3_ENDPOINT_URL"] == ""


@pytest.mark.parametrize("name", sorted(deployment_env_blocks()))
def test_deployment_settings_validate(name: str, monkeypatch: Any) -> None:
    block = deployment_env_blocks()[name]
    for k in [k for k in os.environ if k.startswith("GUARDSTREAM_")]:
        monkeypatch.delenv(k)
    for k, v in block.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert check_settings(s).ok, check_settings(s).line()
    if "GUARDSTREAM_ALLOWED_BUCKETS" in block:
        assert s.allowed_buckets == ["guardstream-media"]
    if block.get("GUARDSTREAM_S3_ENDPOINT_URL") == "":
        assert s.s3_endpoint_url is None  # AWS S3 itself
    r = subprocess.run(
        [*CLI, "check", "--settings-only"], env=clean_env(**block), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.startswith("ok   settings"), r.stdout + r.stderr


def test_deployments_create_bucket_and_topics(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    (job,) = yaml.safe_load_all((ROOT / "infra/k8s/topics-job.yaml").read_text())
    monkeypatch.setenv("COLUMNS", "250")
    _, usage, _ = run_main(["topics", "create", "--help"], capsys)
    for command in (
        services["topics-init"]["command"],
        job["spec"]["template"]["spec"]["containers"][0]["command"],
    ):
        assert command[:3] == ["guardstream", "topics", "create"]
        for flag in (a for a in command if a.startswith("--")):
            assert flag in usage, flag  # the shipped command line is one the CLI accepts
    assert "mc mb" in services["minio-init"]["command"][0] and BUCKET in services["minio-init"]["command"][0]
    deps = services["worker"]["depends_on"]
    for init in ("topics-init", "minio-init"):
        assert deps[init]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("value", ["a,b", " a , b ", '["a", "b"]'])
def test_list_variables_accept_csv_and_json(value: str, monkeypatch: Any) -> None:
    monkeypatch.setenv("GUARDSTREAM_ALLOWED_BUCKETS", value)
    assert Settings().allowed_buckets == ["a", "b"]


# ---- item 4: the pieces by hand, on the real broker and S3 server ---------------------------------------


def cli(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, input=stdin, capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_topics_create_is_idempotent(kafka_settings: Settings) -> None:
    from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

    sfx = uuid.uuid4().hex[:8]
    names = {
        f"GUARDSTREAM_{k}_TOPIC": f"{k.lower()}-{sfx}" for k in ("POSTS", "VERDICTS", "REVIEWS", "ALERTS")
    }
    env = clean_env(GUARDSTREAM_BOOTSTRAP_SERVERS=kafka_settings.bootstrap_servers, **names)
    first = cli(["topics", "create", "--partitions", "4"], env)
    assert first.returncode == 0, first.stderr[-2000:]
    md = AdminClient({"bootstrap.servers": kafka_settings.bootstrap_servers}).list_topics(timeout=10)
    assert len(md.topics[f"posts-{sfx}"].partitions) == 4 and len(md.topics[f"reviews-{sfx}"].partitions) == 1
    again = cli(["topics", "create", "--partitions", "4"], env)
    assert again.returncode == 0 and "created" not in again.stdout and "exists" in again.stdout


@pytest.mark.integration
def test_produce_uploads_images_and_tail_follows_the_worker(
    kafka_settings: Settings, services: Services, cpu_engine: Any, tmp_path: Path
) -> None:
    from guard.samples import drawn_image, png_bytes
    from workers.wiring import build_worker

    pics = tmp_path / "pics"
    pics.mkdir()
    rel, absolute = png_bytes(drawn_image(1)), png_bytes(drawn_image(2))
    (pics / "a.png").write_bytes(rel)
    (tmp_path / "b.png").write_bytes(absolute)
    sfx = uuid.uuid4().hex[:6]
    posts = [
        {
            "post_id": f"t-{sfx}",
            "author_id": "u1",
            "created_at": "2026-01-01T00:00:00Z",
            "text": "Lovely day!",
        },
        {
            "post_id": f"i-{sfx}",
            "author_id": "u2",
            "created_at": "2026-01-01T00:00:00Z",
            "images": ["pics/a.png"],
        },
        {
            "post_id": f"f-{sfx}",
            "author_id": "u3",
            "created_at": "2026-01-01T00:00:00Z",
            "text": "see",
            "images": [f"file://{tmp_path / 'b.png'}"],
        },
    ]
    feed = tmp_path / "posts.jsonl"
    feed.write_text("# hand-written posts\n" + "\n".join(json.dumps(p) for p in posts) + "\n")
    env = support.subprocess_env(kafka_settings, GUARDSTREAM_LOG_FORMAT="json")

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(posts[0]) + "\n{not json\n")
    refused = cli(["produce", str(bad)], env)
    assert (
        refused.returncode == 1 and "line 2: not JSON" in refused.stderr and "Traceback" not in refused.stderr
    )
    assert (
        read_topic(kafka_settings.bootstrap_servers, kafka_settings.posts_topic, timeout_s=5) == []
    )  # nothing sent

    r = cli(["produce", str(feed)], env)
    assert r.returncode == 0 and "produced 3 posts" in r.stdout and "uploaded 2 images" in r.stdout, r.stderr
    sent = {
        p["post_id"]: p
        for p in map(json.loads, read_topic(kafka_settings.bootstrap_servers, kafka_settings.posts_topic))
    }
    assert set(sent) == {p["post_id"] for p in posts}
    s3 = services.s3_client()
    for pid, data in ((f"i-{sfx}", rel), (f"f-{sfx}", absolute)):
        (ref,) = sent[pid]["images"]
        assert ref.startswith(f"s3://{BUCKET}/uploads/"), ref
        key = ref.removeprefix(f"s3://{BUCKET}/")
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
    # stdin, and the sample feed (its hostile posts go out as they are: they are meant to be dead-lettered)
    assert cli(["produce", "-"], env, stdin=json.dumps({**posts[0], "post_id": f"s-{sfx}"})).returncode == 0
    sample = cli(["produce", "--sample", "20"], env)
    assert sample.returncode == 0 and "produced 20 posts" in sample.stdout, sample.stderr

    stats = build_worker(kafka_settings, cpu_engine).run(until_drained=True)
    assert stats.consumed == 24
    n_out = stats.verdicts + stats.dead_letters
    assert stats.dead_letters > 0

    js = cli(["tail", "verdicts", "dead-letters", "--from-beginning", "--limit", str(n_out), "--json"], env)
    assert js.returncode == 0, js.stderr[-2000:]
    events = [json.loads(x) for x in js.stdout.splitlines()]
    assert len(events) == n_out
    assert {f"t-{sfx}", f"i-{sfx}", f"f-{sfx}", f"s-{sfx}"} <= {e["post_id"] for e in events}
    assert sum(1 for e in events if "error_code" in e) == stats.dead_letters

    table = cli(["tail", "--from-beginning", "--idle-timeout", "3"], {**env, "COLUMNS": "200"})
    assert table.returncode == 0 and f"t-{sfx}" in table.stdout and "p_unsafe" in table.stdout, table.stderr

    missing = cli(["tail", "alerts", "--limit", "1"], {**env, "GUARDSTREAM_ALERTS_TOPIC": f"none-{sfx}"})
    assert missing.returncode == 1 and "do not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_shell_completion_offers_commands_and_engines() -> None:
    def complete(words: str, cword: int) -> list[str]:
        env = clean_env(_GUARDSTREAM_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(cword))
        return subprocess.run(CLI, env=env, capture_output=True, text=True, timeout=60).stdout.split()

    assert complete("guardstream ta", 1) == ["tail"]
    assert complete("guardstream worker --engine ", 3) == ["cpu", "vllm", "vllm-server", "transformers"]


def test_prepare_posts_uploads_each_local_image_once(tmp_path: Path) -> None:
    from workers.produce import ProduceError, prepare_posts

    (tmp_path / "a.png").write_bytes(b"png-a")
    uploads: list[tuple[str, str, bytes]] = []
    at = '"author_id": "u", "created_at": "2026-01-01T00:00:00Z"'
    lines = [
        f'{{"post_id": "p1", {at}, "images": ["a.png", "s3://{BUCKET}/already/there.png"]}}',
        f'{{"post_id": "p2", {at}, "images": ["file://{tmp_path / "a.png"}"]}}',
        "",
    ]
    prepared = prepare_posts(
        lines, bucket=BUCKET, base_dir=tmp_path, upload=lambda *a: uploads.append(a), validate=True
    )
    (key,) = {k for _, k, _ in uploads}
    assert len(uploads) == 1 and uploads[0][2] == b"png-a"  # one file, uploaded once for both posts
    first, second = (json.loads(v) for _, v in prepared.items)
    assert first["images"] == [f"s3://{BUCKET}/{key}", f"s3://{BUCKET}/already/there.png"]
    assert second["images"] == [f"s3://{BUCKET}/{key}"]
    assert [k for k, _ in prepared.items] == [b"p1", b"p2"]
    with pytest.raises(ProduceError, match="line 1: author_id"):
        prepare_posts(
            ['{"post_id": "x", "created_at": "2026-01-01T00:00:00Z"}'],
            bucket=BUCKET,
            base_dir=tmp_path,
            upload=lambda *a: None,
        )
    with pytest.raises(ProduceError, match=r"line 1: image 'missing\.png'"):
        prepare_posts(
            [f'{{"post_id": "x", {at}, "images": ["missing.png"]}}'],
            bucket=BUCKET,
            base_dir=tmp_path,
            upload=lambda *a: None,
        )
    raw = prepare_posts(
        ["{not json"], bucket=BUCKET, base_dir=tmp_path, upload=lambda *a: None, validate=False
    )
    assert raw.items == [(None, b"{not json")]  # --raw: sent as it is, to be dead-lettered
