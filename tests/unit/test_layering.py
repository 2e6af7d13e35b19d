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
    return None


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


def test_dependencies_flow_one_way() -> None:
    bad = violations()
    assert not bad, "backwards imports:\n" + "\n".join(bad)


def test_the_worker_loop_is_the_top_of_workers_kafka() -> None:
    """``workers/kafka/worker.py`` composes the Kafka parts (checkpoint, publisher, broker watch, outages,
    run conditions, offsets, client configs); none of them reaches back up into the loop."""
    kafka = ROOT / "workers" / "kafka"
    parts = [p for p in kafka.glob("*.py") if p.name not in ("worker.py", "__init__.py")]
    assert {p.stem for p in parts} >= {"checkpoint", "publisher", "broker_watch", "outages", "run_until"}
    bad = [
        f"{p.relative_to(ROOT).as_posix()}:{line} imports {module}"
        for p in parts
        for line, module in imported_modules(p)
        if module == "workers.kafka.worker"
    ]
    assert not bad, bad
