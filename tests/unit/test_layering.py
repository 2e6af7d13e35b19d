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


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import statement in ``path``; relative imports as ``.name``."""
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
    return found


def python_files() -> list[Path]:
    files: list[Path] = []
    for pkg in PACKAGES:
        files.extend(p for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    return sorted(files)


def violations() -> list[str]:
    bad: list[str] = []
    for path in python_files():
        rel = path.relative_to(ROOT).as_posix()
        owner = rel.split("/", 1)[0]
        for line, module in imported_modules(path):
            where = f"{rel}:{line} imports {module}"
            if module.startswith("."):
                bad.append(f"{where} (relative import; use the absolute package path)")
                continue
            top = module.split(".", 1)[0]
            if top in FORBIDDEN.get(owner, frozenset()):
                if top == "training" and rel.startswith(TRAINING_ALLOWED_IN_WORKERS):
                    continue
                bad.append(f"{where} ({owner} must not depend on {top})")
            elif top == "infra" and not rel.startswith(INFRA_ALLOWED):
                bad.append(f"{where} (only the CLI, the demo, bench and tests may use the local stack)")
    return bad


def test_scanner_sees_function_level_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    from infra.stack import free_port\n    return free_port\n")
    assert (4, "infra.stack") in imported_modules(src)


def test_the_tree_has_packages_to_check() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in python_files()}
    assert "schemas/events.py" in names and "workers/cli/__init__.py" in names


def test_dependencies_flow_one_way() -> None:
    bad = violations()
    assert not bad, "backwards imports:\n" + "\n".join(bad)
