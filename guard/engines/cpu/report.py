"""The CPU engine's own held-out report: ``python -m guard.engines.cpu.report [--speed]``.

Measures, in one run and on the same rows, the shipped head (``guard.engines.cpu.engine.CpuEngine``) and the
nearest-prototype baseline it replaced (``guard.engines.cpu.prototype.PrototypeEngine``) on the ``test`` split
of the project's own data (``guard.engines.cpu.data``: whole templates held out, never seen in training or
calibration). These are numbers on the project's own synthetic posts: they show the head learned intent over
topic better than the prototypes did; they do not predict scores on anyone else's data.

``report()`` returns a plain dict (for the CLI and the benchmark to show); ``speed()`` measures posts/s and
peak RSS of one engine in a fresh interpreter so its RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from guard.embeddings import Embedder, shared_embedder
from guard.engines.cpu.data import Example, build_dataset
from guard.engines.cpu.head import HEAD_PATH
from guard.engines.cpu.metrics import average_precision, rate
from guard.prompts import PromptSet
from guard.taxonomy import Taxonomy
from guard.types import GuardEngine, ModerationItem, Verdict

NOVEL = "novel"
MISSED = "missed"


def _engines(head_path: Path, embedder: Embedder) -> dict[str, GuardEngine]:
    from guard.engines.cpu.engine import CpuEngine
    from guard.engines.cpu.prototype import PrototypeEngine

    prompts = PromptSet(Taxonomy.load())
    return {
        "head": CpuEngine(prompts, embedder=embedder, head_path=head_path),
        "prototype": PrototypeEngine(prompts, embedder=embedder),
    }


def _metrics(rows: list[Example], verdicts: list[Verdict]) -> dict[str, Any]:
    y = np.array([r.unsafe for r in rows])
    p = np.array([v.p_unsafe or 0.0 for v in verdicts], dtype=np.float64)
    flagged = np.array([v.safe is False for v in verdicts])
    kind = np.array([r.kind for r in rows])
    tp = int((flagged & y).sum())
    pos = [k for k, r in enumerate(rows) if r.unsafe]
    caught = [k for k in pos if flagged[k]]
    known = [k for k in caught if rows[k].sub is not None]  # caught, of a known subcategory
    unknown = [k for k, r in enumerate(rows) if r.kind == "novel"]  # harm that fits no subcategory
    sub_ok = sum(verdicts[k].subcategory == rows[k].sub for k in known)
    cat_ok = sum((verdicts[k].category or "") == (rows[k].sub or "").split("S")[0] for k in known)
    return {
        "n": len(rows),
        "n_unsafe": int(y.sum()),
        "auprc": round(average_precision(y, p), 4),
        "chance_auprc": round(float(y.mean()), 4),
        "precision": round(tp / max(int(flagged.sum()), 1), 4),
        "recall": round(tp / max(int(y.sum()), 1), 4),
        "hard_negative_fpr": round(rate(kind == "hard", flagged), 4),
        "everyday_fpr": round(rate(kind == "everyday", flagged), 4),
        "subcategory_accuracy_of_caught": round(sub_ok / max(len(known), 1), 4),
        "category_accuracy_of_caught": round(cat_ok / max(len(known), 1), 4),
        "novel_of_caught": round(
            sum(verdicts[k].novel_risk is not None for k in known) / max(len(known), 1), 4
        ),
        "novel_rows_reported_novel": round(
            sum(verdicts[k].novel_risk is not None for k in unknown) / max(len(unknown), 1), 4
        ),
    }


def _confusion(rows: list[Example], verdicts: list[Verdict]) -> dict[str, dict[str, int]]:
    """True subcategory -> what the engine said (a subcategory, ``novel`` or ``missed``), unsafe rows only."""
    out: dict[str, dict[str, int]] = {}
    for r, v in zip(rows, verdicts, strict=True):
        if not r.unsafe or r.sub is None:
            continue
        said = MISSED if v.safe is not False else (v.subcategory or NOVEL)
        row = out.setdefault(r.sub, {})
        row[said] = row.get(said, 0) + 1
    return out


def category_table(confusion: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    """The subcategory confusion folded per main category: of its unsafe rows, the share the engine gave
    the right subcategory, the right category but another subcategory, another category (and which one
    most often), a novel risk, or missed (judged safe)."""
    by_cat: dict[str, dict[str, int]] = {}
    for sub, said in confusion.items():
        cat = sub.split("S")[0]
        row = by_cat.setdefault(cat, {})
        for k, v in said.items():
            if k in (NOVEL, MISSED):
                bucket = k
            elif k == sub:
                bucket = "right_sub"
            elif k.split("S")[0] == cat:
                bucket = "right_cat"
            else:
                bucket = "other:" + k.split("S")[0]
            row[bucket] = row.get(bucket, 0) + v
    out: list[dict[str, Any]] = []
    for cat in sorted(by_cat, key=lambda c: int(c[1:])):
        row = by_cat[cat]
        n = sum(row.values())
        others = {k.split(":")[1]: v for k, v in row.items() if k.startswith("other:")}
        top = max(others, key=lambda k: others[k]) if others else "-"
        out.append(
            {
                "category": cat,
                "n": n,
                "right_sub": round(row.get("right_sub", 0) / n, 2),
                "right_cat_other_sub": round(row.get("right_cat", 0) / n, 2),
                "other_cat": round(sum(others.values()) / n, 2),
                "top_other_cat": top,
                "novel": round(row.get(NOVEL, 0) / n, 2),
                "missed": round(row.get(MISSED, 0) / n, 2),
            }
        )
    return out


def report(
    head_path: Path = HEAD_PATH,
    split: str = "test",
    limit: int | None = None,
    embedder: Embedder | None = None,
) -> dict[str, Any]:
    """Held-out metrics of the head and of the prototype baseline, on the same rows, in this run.

    ``limit`` takes an evenly spaced slice of the split (every k-th row, so every template stays in).
    """
    rows = [r for r in build_dataset() if r.split == split]
    if limit and limit < len(rows):
        rows = rows[:: -(-len(rows) // limit)]
    emb = embedder or shared_embedder()
    items = [ModerationItem(str(k), r.text) for k, r in enumerate(rows)]
    out: dict[str, Any] = {"split": split, "rows": len(rows)}
    for name, engine in _engines(head_path, emb).items():
        t0 = time.perf_counter()
        verdicts: list[Verdict] = []
        for k in range(0, len(items), 64):
            verdicts += engine.moderate(items[k : k + 64])
        out[name] = _metrics(rows, verdicts) | {"model_version": engine.model_version}
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
        if name == "head":
            out["head_confusion"] = _confusion(rows, verdicts)
    return out


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). ``ru_maxrss`` is not used: Linux carries it across
    fork+exec, so a child started by a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _speed_child(engine: str, n_short: int, n_long: int) -> dict[str, float]:
    from guard.engines.cpu.engine import CpuEngine
    from guard.engines.cpu.prototype import PrototypeEngine

    rows = build_dataset()
    rss0 = _peak_rss_mb()
    prompts = PromptSet(Taxonomy.load())
    eng: GuardEngine = CpuEngine(prompts) if engine == "head" else PrototypeEngine(prompts)
    short = [ModerationItem(str(i), f"{rows[i % len(rows)].text} #{i}") for i in range(n_short)]
    # Long posts: about 300 words of everyday sentences (8 windows each for the head).
    everyday = [r.text for r in rows if r.kind == "everyday"]
    long_text = " ".join(everyday[:40])
    long = [ModerationItem(f"l{i}", f"{long_text} #{i}") for i in range(n_long)]
    eng.moderate(short[:32])
    t0 = time.perf_counter()
    for i in range(0, n_short, 32):
        eng.moderate(short[i : i + 32])
    t1 = time.perf_counter()
    for i in range(0, n_long, 8):
        eng.moderate(long[i : i + 8])
    t2 = time.perf_counter()
    # the demo feed's short posts (one line each): the workload the earlier benchmark timed
    from guard.samples import TEXTS

    feed = [ModerationItem(f"f{i}", f"{TEXTS[i % len(TEXTS)][1]} #{i}") for i in range(n_short)]
    for i in range(0, n_short, 32):
        eng.moderate(feed[i : i + 32])
    t3 = time.perf_counter()
    return {
        "feed_posts_s": round(n_short / (t3 - t2), 1),
        "short_posts_s": round(n_short / (t1 - t0), 1),
        "long_posts_s": round(n_long / (t2 - t1), 1),
        "long_post_words": len(long_text.split()),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "base_rss_mb": round(rss0, 1),
    }


def speed(engine: str = "head", n_short: int = 1024, n_long: int = 64) -> dict[str, float]:
    """Posts/s (batches of 32 short posts; batches of 8 long posts) and peak RSS, in a fresh interpreter."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "guard.engines.cpu.report",
            "--child-speed",
            engine,
            str(n_short),
            str(n_long),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"speed child for {engine} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def print_report(r: dict[str, Any]) -> None:
    keys = [
        "auprc",
        "chance_auprc",
        "precision",
        "recall",
        "hard_negative_fpr",
        "everyday_fpr",
        "subcategory_accuracy_of_caught",
        "category_accuracy_of_caught",
        "novel_of_caught",
        "novel_rows_reported_novel",
        "seconds",
    ]
    print(f"CPU engine held-out report: split={r['split']} rows={r['rows']} (unsafe {r['head']['n_unsafe']})")
    print(f"{'metric':32} {'head':>10} {'prototype':>10}")
    for k in keys:
        print(f"{k:32} {r['head'][k]:>10} {r['prototype'][k]:>10}")
    print("head subcategory confusion (true -> said, unsafe test rows):")
    for sub, said in sorted(r["head_confusion"].items(), key=lambda kv: (len(kv[0]), kv[0])):
        total = sum(said.values())
        parts = ", ".join(f"{k}:{v}" for k, v in sorted(said.items(), key=lambda kv: -kv[1]))
        print(f"  {sub:6} n={total:3}  {parts}")
    print("head per main category (share of its unsafe test rows):")
    cols = ["n", "right_sub", "right_cat_other_sub", "other_cat", "top_other_cat", "novel", "missed"]
    print(f"  {'cat':4} " + " ".join(f"{c:>19}" for c in cols))
    for row in category_table(r["head_confusion"]):
        print(f"  {row['category']:4} " + " ".join(f"{row[c]!s:>19}" for c in cols))
    for name in ("head", "prototype"):
        if f"speed_{name}" in r:
            print(f"speed {name}: {r[f'speed_{name}']}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Held-out report of the CPU engine vs the prototype baseline")
    ap.add_argument("--split", default="test", choices=["test", "calib", "train"])
    ap.add_argument("--limit", type=int, default=None, help="an evenly spaced slice of the split")
    ap.add_argument("--speed", action="store_true", help="also measure posts/s and peak RSS of both engines")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--child-speed", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_speed:
        engine, n_short, n_long = a.child_speed
        print(json.dumps(_speed_child(engine, int(n_short), int(n_long))))
        return
    r = report(split=a.split, limit=a.limit)
    if a.speed:
        r["speed_head"] = speed("head")
        r["speed_prototype"] = speed("prototype")
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print_report(r)


if __name__ == "__main__":
    main()
