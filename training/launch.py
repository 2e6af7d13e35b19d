"""GRPO fine-tuning entry point for a ProGuard checkpoint on a guardstream export.

    python -m training.launch --config training/grpo.yaml --dry-run   # CPU: validate inputs
    python -m training.launch --config training/grpo.yaml             # GPU: train with TRL's GRPOTrainer

``--dry-run`` loads both splits, checks every record (prompt, images on disk, labels), renders the
prompts, and scores canned completions (the ground truth, a flipped label, a wrong category, a
malformed output) with every reward function, printing a table: a quick proof that the data and the
rewards agree before GPU time is spent.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from training.rewards import REWARD_FUNCS, total_reward


def load_split(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def validate(records: list[dict[str, Any]], root: Path) -> list[str]:
    problems = []
    for r in records:
        e = r["extra_info"]
        pid = e.get("post_id")
        if (
            r["prompt"][0]["role"] != "system"
            or "<BEGIN UNSAFE CONTENT CATEGORIES>" not in r["prompt"][0]["content"]
        ):
            problems.append(f"{pid}: system prompt is not ProGuard's")
        if r["prompt"][1]["content"].count("<image>") != len(r["images"]):
            problems.append(f"{pid}: <image> placeholders do not match images")
        for img in r["images"]:
            if not img.startswith("s3://") and not (root / img).is_file():
                problems.append(f"{pid}: missing image file {img}")
        if e["query_label"] not in ("safe", "unsafe") or e["modality"] not in ("text", "image", "text-image"):
            problems.append(f"{pid}: bad labels {e['query_label']}/{e['modality']}")
    return problems


def canned(record: dict[str, Any]) -> dict[str, str]:
    e = record["extra_info"]
    truth = "<think>\nreasoning\n</think>\n" + record["reward_model"]["ground_truth"]
    image = e["modality"] == "image"
    resp = "" if image else "Response:safe\n"
    flipped = "safe" if e["query_label"] == "unsafe" else "unsafe"
    flipped_cat = "None" if flipped == "safe" else "C1S1"
    wrong_cat = "C5S1" if e["category"] != "C5S1" else "C6S1"
    head = "<think>\nr\n</think>\n<answer>\n"
    return {
        "ground truth": truth,
        "flipped label": f"{head}Request:{flipped}\n{resp}Category:{flipped_cat}\n</answer>",
        "wrong category": f"{head}Request:unsafe\n{resp}Category:{wrong_cat}\n</answer>",
        "malformed": "Request: unsafe, probably",
    }


def dry_run(cfg: dict[str, Any], console: Console, limit: int = 8) -> int:
    root = Path(cfg["dataset_dir"])
    splits = {s: load_split(root / f"{s}.jsonl") for s in ("train", "validation")}
    problems = [p for recs in splits.values() for p in validate(recs, root)]
    console.print(f"dataset {root}: " + ", ".join(f"{k}={len(v)}" for k, v in splits.items()))
    for p in problems[:20]:
        console.print(f"[red]problem[/] {p}")
    t = Table(title="rewards on canned completions")
    for col in ("post", "modality", "truth", "completion", *(f.__name__ for f in REWARD_FUNCS), "total"):
        t.add_column(col)
    for rec in (splits["train"] + splits["validation"])[:limit]:
        e = rec["extra_info"]
        for kind, text in canned(rec).items():
            scores = [f([text], [e])[0] for f in REWARD_FUNCS]
            tot = total_reward([text], [e])[0]
            t.add_row(
                e["post_id"],
                e["modality"],
                f"{e['query_label']} {e['category'] or e['original_category']}",
                kind,
                *(f"{x:.2f}" for x in scores),
                f"{tot:.2f}",
            )
    console.print(t)
    return 1 if problems else 0


def train(cfg: dict[str, Any]) -> int:  # pragma: no cover - needs GPUs and the weights
    from datasets import load_dataset
    from trl import GRPOConfig, GRPOTrainer

    root = Path(cfg["dataset_dir"])
    data = load_dataset(
        "json", data_files={"train": str(root / "train.jsonl"), "validation": str(root / "validation.jsonl")}
    )
    weights = cfg.get("reward_weights", {})
    args = GRPOConfig(
        output_dir=cfg["output_dir"],
        learning_rate=cfg["learning_rate"],
        beta=cfg["beta"],
        num_generations=cfg["num_generations"],
        max_prompt_length=cfg["max_prompt_length"],
        max_completion_length=cfg["max_completion_length"],
        per_device_train_batch_size=cfg["per_device_train_batch_size"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
        num_train_epochs=cfg["num_train_epochs"],
        bf16=cfg["bf16"],
        use_vllm=cfg["use_vllm"],
        reward_weights=[weights.get(f.__name__, 1.0) for f in REWARD_FUNCS],
    )
    trainer = GRPOTrainer(
        model=cfg["model"],
        reward_funcs=list(REWARD_FUNCS),
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
    )
    trainer.train()
    trainer.save_model(cfg["output_dir"])
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).with_name("grpo.yaml")))
    ap.add_argument("--dataset-dir", help="override dataset_dir from the config")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(a.config).read_text())
    if a.dataset_dir:
        cfg["dataset_dir"] = a.dataset_dir
    console = Console(width=160)
    return dry_run(cfg, console) if a.dry_run else train(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
