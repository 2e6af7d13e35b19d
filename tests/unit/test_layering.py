"""Dependencies flow one way: ``schemas`` <- ``guard`` <- ``workers`` <- ``training``.

Every module's imports are read with :mod:`ast` (module-level and function-level ``import``/``from``
statements alike, since a lazy import inside a function is still a dependency), and the test fails on:

* ``schemas`` importing ``guard``, ``workers``, ``training`` or ``infra`` (the wire format depends on nothing
  of ours);
* ``guard`` importing ``workers``, ``training`` or ``infra`` (the engines know nothing of Kafka or the CLI);
* ``workers`` importing ``training`` -- except ``workers/cli/``, the composition root: the CLI exposes the
  training-export commands and may call into ``training`` (``training`` never imports ``workers.cli``, so no
  cycle);
* any module importing ``infra`` (the embedded local stack: a Tansu broker, moto S3, a throwaway Redis)
  except ``infra/`` itself, ``workers/cli/`` (``guardstream up`` / ``demo`` start that stack),
  ``workers/demo*`` (the demo feed), ``bench/`` (benchmarks start their own stack) and ``tests/``. Production
  code paths -- the worker, console, audits, alerts -- must run against a real cluster with no ``infra``
  on the path.

Inside ``workers`` the same rule holds between its parts, lowest first (``WORKERS_LAYERS``): settings,
secrets and observability know nothing above them; media and the cache sit on those; the transport-free
``pipeline`` on media and cache; ``kafka`` (clients, offsets, the worker loop) on the pipeline; the
applications (wiring, audit, alerts, console, reviews, redrive, tail, produce, preflight, demo) on
``kafka``; ``cli`` on everything. A module imports only from its own layer or below.

Inside ``guard`` the engines (``guard/engines/``: one module or subpackage per backend, and the registry
``guard.engines`` that builds them) sit on the shared parts (types, errors, config, prompts, taxonomy, parser,
chat, streaming, embeddings, samples): a shared module imports no engine (``GUARD_ENGINE_USERS``, the device
checks that drive the engines, may), and an engine imports neither another engine nor the registry. Outside
``guard``, ``workers`` reaches the engines only through the registry (``build_streaming_engine``,
``EngineKind``), never an engine's module; ``bench``, ``training`` and ``tests`` may use an engine directly.

The core -- ``workers/pipeline/``, ``workers/kafka/`` and ``workers/cache.py`` -- reports what it observes
to an injected ``workers.observability.sensors.Sensor``: it imports neither ``workers.observability.metrics``
(the Prometheus objects and the health state) nor ``prometheus_client`` (``CORE_UNOBSERVED``).

Relative imports are not used in this code base; a relative import is reported too so that it cannot hide a
dependency from this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "guard", "workers", "training", "infra", "bench", "tests")

FORBIDDEN: dict[str, frozenset[str]] = {
    "schemas": frozenset({"guard", "workers", "training", "infra"}),
    "guard": frozenset({"workers", "training", "infra"}),
    "workers": frozenset({"training"}),
}
# paths (relative to the repo root, '/'-separated) allowed to import `infra`
INFRA_ALLOWED = ("infra/", "workers/cli/", "workers/demo", "bench/", "tests/")
# the composition root may reach up into `training`
TRAINING_ALLOWED_IN_WORKERS = ("workers/cli/",)
# guard's engines: guard/engines/<engine>.py or guard/engines/<engine>/, built by the registry guard.engines
ENGINES_DIR = ROOT / "guard" / "engines"
ENGINES = frozenset(
    p.stem if p.suffix == ".py" else p.name
    for p in ENGINES_DIR.iterdir()
    if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
)
# guard modules outside guard/engines/ that may drive the engines: the device checks
GUARD_ENGINE_USERS = ("guard/gpu_smoke.py", "guard/gpu_proof.py")
# the core reports to an injected sensor: it never calls the Prometheus objects itself
CORE = ("workers/pipeline/", "workers/kafka/", "workers/cache.py")
CORE_UNOBSERVED = ("workers.observability.metrics", "prometheus_client")


# workers' parts, lowest first; a module may import from its own layer and the ones before it
WORKERS_LAYERS: tuple[tuple[str, ...], ...] = (
    ("workers.settings", "workers.secrets", "workers.observability"),
    ("workers.media", "workers.cache"),
    ("workers.pipeline", "workers.testing"),  # testing: fakes of the pipeline's seams
    ("workers.kafka",),
    (
        "workers.wiring",
        "workers.audit",
        "workers.alerts",
        "workers.console",
        "workers.reviews",
        "workers.redrive",
        "workers.tail",
        "workers.produce",
        "workers.preflight",
        "workers.demo",
    ),
    ("workers.cli",),
)


def workers_layer(module: str) -> int | None:
    """The layer of a ``workers.*`` module (or None for ``workers`` itself / an unlisted part)."""
    for i, parts in enumerate(WORKERS_LAYERS):
        if any(module == p or module.startswith(p + ".") for p in parts):
            return i
    return None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import statement in ``path``; relative imports as ``.name``.
    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (``c`` may be a module: ``from
    workers.observability import metrics``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, "." * node.level + (node.module or "")))
            elif node.module:
                found.append((node.lineno, node.module))
                found.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names if a.name != "*")
    return found


def python_files() -> list[Path]:
    files: list[Path] = []
    for pkg in PACKAGES:
        files.extend(p for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    return sorted(files)


def engine_of(name: str) -> str | None:
    """The engine a dotted module or a '/'-separated path belongs to (``guard.engines.cpu.head`` ->
    ``cpu``), or None (the registry ``guard.engines``, a name imported from it, anything else)."""
    parts = name.removesuffix(".py").replace("/", ".").split(".")
    if parts[:2] == ["guard", "engines"] and len(parts) > 2 and parts[2] in ENGINES:
        return parts[2]
    return None


def engines_problem(rel: str, module: str) -> str | None:
    """Why ``rel`` may not import ``module`` under the engines' rules, or None."""
    if module != "guard.engines" and not module.startswith("guard.engines."):
        return None
    mine, theirs = engine_of(rel), engine_of(module)
    if rel.startswith("guard/engines/"):
        if mine is not None and theirs != mine:  # the registry (guard/engines/__init__.py) may build any
            return "an engine must not depend on another engine or on the registry"
    elif rel.startswith("guard/") and rel not in GUARD_ENGINE_USERS:
        return "guard's shared modules sit below the engines"
    elif rel.startswith("workers/") and theirs is not None:
        return "workers reach the engines through the registry (guard.engines), not an engine's module"
    return None


def problem(rel: str, module: str) -> str | None:
    """Why file ``rel`` (repo-relative, '/'-separated) may not import ``module``, or None if it may."""
    owner = rel.split("/", 1)[0]
    if module.startswith("."):
        return "relative import; use the absolute package path"
    top = module.split(".", 1)[0]
    if top in FORBIDDEN.get(owner, frozenset()):
        if not (top == "training" and rel.startswith(TRAINING_ALLOWED_IN_WORKERS)):
            return f"{owner} must not depend on {top}"
    elif top == "infra" and not rel.startswith(INFRA_ALLOWED):
        return "only the CLI, the demo, bench and tests may use the local stack"
    if rel.startswith(CORE) and any(module == m or module.startswith(m + ".") for m in CORE_UNOBSERVED):
        return "the core reports to an injected Sensor (workers.observability.sensors), not to metrics"
    if owner == "workers" and top == "workers":
        mine = workers_layer(rel.removesuffix(".py").replace("/", "."))
        theirs = workers_layer(module)
        if mine is not None and theirs is not None and theirs > mine:
            return "a lower part of workers must not depend on a higher one"
    return engines_problem(rel, module)


def violations() -> list[str]:
    bad: list[str] = []
    for path in python_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, module in imported_modules(path):
            why = problem(rel, module)
            if why:
                bad.append(f"{rel}:{line} imports {module} ({why})")
    return bad


def test_scanner_sees_function_level_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    from infra.stack import free_port\n    return free_port\n")
    assert (4, "infra.stack") in imported_modules(src)


def test_the_tree_has_packages_to_check() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in python_files()}
    assert "schemas/events.py" in names and "workers/cli/__init__.py" in names


def test_every_part_of_workers_has_a_layer() -> None:
    # a new package under workers/ must be placed in WORKERS_LAYERS, or the rule would skip it
    parts = {
        "workers." + p.relative_to(ROOT / "workers").with_suffix("").parts[0]
        for p in (ROOT / "workers").rglob("*.py")
        if p.name != "__init__.py" or p.parent != ROOT / "workers"
    }
    assert {p for p in parts if workers_layer(p) is None} == set()


def test_a_lower_part_of_workers_importing_a_higher_one_is_reported() -> None:
    # the settings once imported the alerts app's clustering (ClusterConfig): now reported
    assert problem("workers/settings.py", "workers.alerts.clustering")
    assert problem("workers/pipeline/moderator.py", "workers.kafka.worker")
    assert problem("workers/kafka/worker.py", "workers.cli.base")
    assert problem("workers/media.py", "workers.pipeline.records")
    # downwards and sideways within a layer are fine
    assert problem("workers/alerts/clustering.py", "workers.settings") is None
    assert problem("workers/kafka/worker.py", "workers.pipeline.moderator") is None
    assert problem("workers/console/app.py", "workers.wiring") is None
    assert problem("workers/cli/worker.py", "workers.kafka.worker") is None


def test_the_core_does_not_import_the_metrics(tmp_path: Path) -> None:
    for rel in ("workers/pipeline/moderator.py", "workers/kafka/worker.py", "workers/cache.py"):
        assert problem(rel, "workers.observability.metrics"), rel
        assert problem(rel, "prometheus_client"), rel
        assert problem(rel, "prometheus_client.core"), rel
        assert problem(rel, "workers.observability.sensors") is None, rel
    assert problem("workers/kafka/lag.py", "workers.observability.metrics")
    # the composition root, the observability layer itself and the CLI may
    assert problem("workers/wiring.py", "workers.observability.metrics") is None
    assert problem("workers/observability/sensors.py", "workers.observability.metrics") is None
    assert problem("workers/cli/worker.py", "workers.observability.metrics") is None
    assert problem("workers/cachetools.py", "prometheus_client") is None  # not workers/cache.py
    # `from workers.observability import metrics` is seen as an import of the metrics module
    src = tmp_path / "m.py"
    src.write_text("from workers.observability import metrics\n")
    assert (1, "workers.observability.metrics") in imported_modules(src)


def test_the_engines_sit_on_guards_shared_parts() -> None:
    assert sorted(ENGINES) == ["cpu", "hf", "server", "vllm"]  # a new engine is placed here on purpose
    assert engine_of("guard.engines.cpu.head") == engine_of("guard/engines/cpu/report.py") == "cpu"
    assert engine_of("guard.engines.build_engine") is None and engine_of("guard/engines/__init__.py") is None
    # an engine uses the shared parts and its own modules, not another engine nor the registry
    assert problem("guard/engines/cpu/engine.py", "guard.engines.cpu.head") is None
    assert problem("guard/engines/vllm.py", "guard.chat") is None
    assert problem("guard/engines/cpu/report.py", "guard.engines.vllm")
    assert problem("guard/engines/server.py", "guard.engines.vllm.build_request")
    assert problem("guard/engines/hf.py", "guard.engines")
    # the registry builds them all; a shared module knows none of them, the device checks may
    assert problem("guard/engines/__init__.py", "guard.engines.hf") is None
    assert problem("guard/streaming.py", "guard.engines.cpu.engine")
    assert problem("guard/config.py", "guard.engines")
    assert problem("guard/gpu_smoke.py", "guard.engines") is None
    assert problem("guard/gpu_proof.py", "guard.engines.hf") is None
    # workers build engines through the registry; bench, training and tests may use one directly
    assert problem("workers/wiring.py", "guard.engines.build_streaming_engine") is None
    assert problem("workers/cli/check.py", "guard.engines.EngineKind") is None
    assert problem("workers/preflight.py", "guard.engines.cpu.engine")
    assert problem("bench/gpu.py", "guard.engines.server") is None
    assert problem("training/cpu_head.py", "guard.engines.cpu.head") is None


def test_dependencies_flow_one_way() -> None:
    bad = violations()
    assert not bad, "backwards imports:\n" + "\n".join(bad)


def test_the_worker_loop_is_the_top_of_workers_kafka() -> None:
    """``workers/kafka/worker.py`` composes the Kafka parts (window, checkpoint, publisher, broker watch,
    outages, run conditions, offsets, client configs); none of them reaches back up into the loop."""
    kafka = ROOT / "workers" / "kafka"
    parts = [p for p in kafka.glob("*.py") if p.name not in ("worker.py", "__init__.py")]
    expected = {"window", "checkpoint", "publisher", "broker_watch", "outages", "run_until"}
    assert {p.stem for p in parts} >= expected
    bad = [
        f"{p.relative_to(ROOT).as_posix()}:{line} imports {module}"
        for p in parts
        for line, module in imported_modules(p)
        if module == "workers.kafka.worker"
    ]
    assert not bad, bad
