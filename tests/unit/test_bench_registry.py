"""``python -m bench``'s section registry: names, order, ``--only`` and ``--json`` keys, without running a
benchmark (the stack and every section's ``run`` are replaced by stand-ins)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import bench.__main__ as bench_main
import bench.sections
from bench.harness import FULL, QUICK, SECTIONS, Ctx, Env, Sizes, registry

# What `make bench`, README.md and saved --json files rely on: renaming one is a visible change.
NAMES = ["overhead", "gpu", "cache", "cpu", "memory", "image-memory"]
KEYS = ["overhead", "gpu", "cache", "cpu", "memory", "image_memory"]


def test_the_registry_lists_every_section_once_in_order() -> None:
    secs = registry()
    assert [s.name for s in secs] == NAMES
    assert [s.key for s in secs] == KEYS
    assert len({s.order for s in secs}) == len(secs)
    assert all(s.summary.strip() for s in secs)


def test_every_section_module_registers_one_section_and_exposes_it() -> None:
    registered = {s.run.__module__: s for s in registry()}
    modules = [m.name for m in pkgutil.iter_modules(bench.sections.__path__)]
    assert sorted(registered) == sorted(f"bench.sections.{m}" for m in modules)
    for name in modules:
        mod = importlib.import_module(f"bench.sections.{name}")
        assert getattr(bench.sections, name) is mod, f"bench/sections/__init__.py does not import {name}"
        assert (mod.__doc__ or "").strip(), f"bench.sections.{name} has no docstring"
        sec = registered[mod.__name__]
        assert getattr(mod, "run", None) is sec.run
        assert list(inspect.signature(sec.run).parameters) == ["ctx"]
        if sec.child is not None:
            assert getattr(mod, sec.child.__name__) is sec.child
            assert len(inspect.signature(sec.child).parameters) == 1
    assert [s.name for s in registry() if s.child is not None] == ["memory"]  # `--child memory JSON N`


@pytest.mark.parametrize("name", NAMES)
def test_only_accepts_every_registered_name(name: str) -> None:
    assert [s.name for s in bench_main.parser().parse_args(["--only", name]).only] == [name]


def test_only_runs_in_registry_order_whatever_the_order_given() -> None:
    only = bench_main.parser().parse_args(["--only", "cache,overhead,cache,"]).only
    assert [s.name for s in only] == ["overhead", "cache"]


def test_an_unknown_name_is_a_one_line_error_listing_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_main.parser().parse_args(["--only", "overhead,gpus"])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1, errors
    assert "'gpus'" in errors[0] and ",".join(NAMES) in errors[0]


def test_help_lists_the_sections_from_the_registry() -> None:
    text = bench_main.parser().format_help()
    positions = [text.index(f"{i}. {name}:") for i, name in enumerate(NAMES, 1)]
    assert positions == sorted(positions)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Sizes]]:
    """Every section's ``run`` replaced by a recorder, the local stack by a stand-in ``Env``."""
    calls: list[tuple[str, Sizes]] = []
    for sec in registry():

        def run(ctx: Ctx, name: str = sec.name) -> dict[str, Any]:
            calls.append((name, ctx.sizes))
            return {"section": name}

        monkeypatch.setitem(SECTIONS, sec.name, dataclasses.replace(sec, run=run))

    @contextmanager
    def no_stack() -> Iterator[Env]:
        yield Env("127.0.0.1:1", "http://127.0.0.1:1", "redis://127.0.0.1:1/0")

    monkeypatch.setattr(bench_main, "local_stack", no_stack)
    monkeypatch.setattr(bench_main, "configure_logging", lambda *_: None)  # the test run's logging stays
    return calls


def test_the_default_runs_every_section_in_order_with_full_sizes(
    recorded: list[tuple[str, Sizes]], tmp_path: Path
) -> None:
    out = tmp_path / "results.json"
    assert bench_main.main(["--json", str(out)]) == 0
    assert recorded == [(name, FULL) for name in NAMES]
    results = json.loads(out.read_text())
    assert list(results) == KEYS
    assert [r["section"] for r in results.values()] == NAMES


def test_quick_runs_the_chosen_sections_with_quick_sizes(recorded: list[tuple[str, Sizes]]) -> None:
    assert bench_main.main(["--quick", "--only", "memory,overhead"]) == 0
    assert recorded == [("overhead", QUICK), ("memory", QUICK)]
