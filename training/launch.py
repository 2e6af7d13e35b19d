"""GRPO fine-tuning entry point for a ProGuard checkpoint on a guardstream export (``--format trl``).

    python -m training.launch --config training/grpo.yaml --dry-run   # CPU: validate inputs and TRL
    python -m training.launch --config training/grpo.yaml             # GPU: train with TRL's GRPOTrainer

Written against the ``train`` extra's pins (``trl``, ``datasets``; see pyproject.toml). ``--dry-run``:

1. loads both splits, checks every record (ProGuard's system prompt, images on disk, no literal
   ``<image>`` in a TRL prompt, labels), and scores canned completions (the ground truth, a flipped
   label, a wrong category, a malformed output) with every reward function, printing a table;
2. with the ``train`` extra installed, builds the real ``GRPOConfig`` from the config (so an argument TRL
   removed fails here, not on a GPU), loads the export with ``datasets`` exactly as training does,
   renders every prompt through TRL's own multimodal message preparation and a Qwen2.5-VL-style chat
   template, and runs GRPO generation-and-scoring steps (``GRPOTrainer._generate_and_score_completions``)
   with the configured reward functions on tiny random policies built from configs on the CPU (no
   download): the text records on a Qwen2 policy, one image record on a Qwen2.5-VL policy (the classes
   of ProGuard-7B, with ``guard.gpu_proof``'s tiny config, tokenizer and processor), so the image goes
   through TRL's VLM input path, the processor, the vision tower, generation and the reference model.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from guard.chat import render_qwen2_5_vl
from training.rewards import MINILM_FLOORS, PROGUARD_FLOORS, make_reward_funcs, total_reward

# Qwen2.5-VL's chat template reduced to what ProGuard's messages use (a system turn, a user turn of image
# parts then text, the generation prompt); guard/gpu_smoke.py checks that guardstream's rendering equals
# the checkpoint's own template. Used only by the dry run's tiny tokenizer.
QWEN2_5_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# GRPOConfig arguments taken from the config file as they are; anything else TRL accepts goes under
# ``grpo_extra``. ``max_prompt_length`` is not one of them: TRL removed it in 0.28 (it no longer
# truncates prompts); like verl's ``filter_overlong_prompts`` (proguard-train.sh) the launcher drops
# over-long prompts from the dataset instead.
GRPO_KEYS = (
    "learning_rate",
    "beta",
    "epsilon",
    "temperature",
    "num_generations",
    "max_completion_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "bf16",
    "use_vllm",
)


def _module(name: str) -> Any:
    """Import a ``train``-extra module untyped: mypy runs with and without the extra installed."""
    return importlib.import_module(name)


def load_split(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def export_format(root: Path) -> str:
    card = root / "card.json"
    return str(json.loads(card.read_text()).get("format", "trl")) if card.exists() else "trl"


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
        if any("<image>" in m["content"] for m in r["prompt"]):
            problems.append(f"{pid}: literal <image> in the prompt (TRL inserts its own image parts)")
        for img in r["images"]:
            if img.startswith("s3://"):
                problems.append(f"{pid}: {img} is not a local file (export without --keep-s3-refs)")
            elif not Path(img).is_absolute() or not Path(img).is_file():
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


def floors_of(cfg: dict[str, Any]) -> tuple[float, float]:
    name = cfg.get("similarity_floors", "minilm")
    if name not in ("minilm", "proguard"):
        raise ValueError(f"similarity_floors must be 'minilm' or 'proguard', not {name!r}")
    return PROGUARD_FLOORS if name == "proguard" else MINILM_FLOORS


def reward_table(splits: dict[str, list[dict[str, Any]]], cfg: dict[str, Any], limit: int) -> Table:
    funcs = make_reward_funcs(floors_of(cfg))
    t = Table(title="rewards on canned completions")
    for col in ("post", "modality", "truth", "completion", *(f.__name__ for f in funcs), "total"):
        t.add_column(col)
    for rec in (splits["train"] + splits["validation"])[:limit]:
        e = rec["extra_info"]
        for kind, text in canned(rec).items():
            scores = [f([text], [e])[0] for f in funcs]
            tot = total_reward([text], [e], floors=floors_of(cfg))[0]
            t.add_row(
                e["post_id"],
                e["modality"],
                f"{e['query_label']} {e['category'] or e['original_category']}",
                kind,
                *(f"{x:.2f}" for x in scores),
                f"{tot:.2f}",
            )
    return t


def grpo_config(cfg: dict[str, Any], **overrides: Any) -> Any:
    """The real ``trl.GRPOConfig`` from the config file (``overrides`` win)."""
    GRPOConfig = _module("trl").GRPOConfig

    weights = cfg.get("reward_weights", {})
    kwargs: dict[str, Any] = {k: cfg[k] for k in GRPO_KEYS if k in cfg}
    kwargs |= {
        "output_dir": cfg["output_dir"],
        "reward_weights": [weights.get(f.__name__, 1.0) for f in make_reward_funcs()],
        **cfg.get("grpo_extra", {}),
        **overrides,
    }
    return GRPOConfig(**kwargs)


def load_trl_dataset(root: Path) -> Any:
    """The export as TRL trains on it: ``datasets``' JSON loader, ``images`` cast to ``datasets.Image``
    (TRL hands them to the processor with the prompt)."""
    ds = _module("datasets")

    files = {s: str(root / f"{s}.jsonl") for s in ("train", "validation") if load_split(root / f"{s}.jsonl")}
    data = ds.load_dataset("json", data_files=files)
    for split in data:
        if any(data[split]["images"]):
            data[split] = data[split].cast_column("images", ds.List(ds.Image()))
    return data


def tiny_policy(out: Path, corpus: list[str]) -> Any:
    """A randomly initialised Qwen2 policy and a byte-level BPE tokenizer trained on ``corpus``, saved to
    ``out`` (GRPO's reference model is loaded from the same path). Built from a config: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tf = _module("transformers")

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN2_5_VL_TEMPLATE
    config = tf.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16384,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    tf.Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return tok


# Characters of stdlib source guard.gpu_proof's tokenizer is trained on for a tiny run (its ``--tiny``
# plan's figure; ~2 s).
TINY_CORPUS_CHARS = 400_000


def tiny_vl_processor() -> Any:
    """The real ``Qwen2_5_VLProcessor`` / ``Qwen2VLImageProcessor`` classes with the engine's min/max
    pixels around ``guard.gpu_proof``'s locally built tokenizer (byte-level BPE, Qwen's special tokens at
    their published ids, so ``<|image_pad|>`` is the id the model config expects), with the dry run's
    Qwen2.5-VL chat template. No download."""
    from guard.engines.hf import TransformersConfig
    from guard.gpu_proof import build_processor, build_tokenizer

    tok, _ = build_tokenizer(TINY_CORPUS_CHARS)
    tok.chat_template = QWEN2_5_VL_TEMPLATE
    processor = build_processor(tok, TransformersConfig(model="tiny-qwen2.5-vl"))
    processor.chat_template = QWEN2_5_VL_TEMPLATE
    return processor


def tiny_vl_policy(out: Path) -> Any:
    """A random Qwen2.5-VL policy (``guard.gpu_proof``'s 2-layer config with a 2-block vision tower,
    Qwen's vocabulary size and special ids) saved to ``out``; returns its processor."""
    from guard.gpu_proof import build_model

    processor = tiny_vl_processor()
    model, _ = build_model(True, "cpu")
    model.save_pretrained(out)
    return processor


def vision_problems(
    prompt_ids: list[list[int]], grid_thw: Any, pixel_values: Any, num_images: list[int], processor: Any
) -> list[str]:
    """Where the processor's vision inputs disagree with the prompt tokens: each row must hold one
    ``<|vision_start|>`` block per image, filled with exactly ``t*h*w / merge²`` ``<|image_pad|>`` tokens
    of that image's ``image_grid_thw`` (and no pad outside a block), and ``pixel_values`` must have one
    row per patch of ``3 * temporal_patch * patch²`` values."""
    tok, ip = processor.tokenizer, processor.image_processor
    start, end, pad = (
        tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
    )
    grids = [tuple(int(x) for x in g) for g in grid_thw.tolist()]
    problems, k = [], 0
    for row, (ids, n) in enumerate(zip(prompt_ids, num_images, strict=True)):
        want = [t * h * w // ip.merge_size**2 for t, h, w in grids[k : k + n]]
        k += n
        runs: list[int] = []
        inside, stray = False, 0
        for i in ids:
            if i == start:
                inside = True
                runs.append(0)
            elif i == end:
                inside = False
            elif i == pad and inside:
                runs[-1] += 1
            elif i == pad or inside:  # a pad outside a block, or another token inside one
                stray += 1
        if runs != want or stray:
            problems.append(f"row {row}: image pad runs {runs} (+{stray} stray tokens), want {want}")
    if k != len(grids):
        problems.append(f"{len(grids)} image grids for {k} images")
    want_shape = (sum(t * h * w for t, h, w in grids), 3 * ip.temporal_patch_size * ip.patch_size**2)
    if tuple(pixel_values.shape) != want_shape:
        problems.append(f"pixel_values {tuple(pixel_values.shape)}, want {want_shape}")
    return problems


def trl_dry_run(cfg: dict[str, Any], root: Path, console: Console) -> dict[str, dict[str, float]]:
    """Step 2 of ``--dry-run`` (needs the ``train`` extra). Returns, per GRPO step run (``"text"``,
    ``"image"``), the mean of each reward over its generations, keyed by reward name; raises on any
    mismatch with TRL."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
    prepare_multimodal_messages = _module("trl.data_utils").prepare_multimodal_messages

    real = grpo_config(cfg, use_cpu=True)  # every configured argument, as the GPU run gets it
    console.print(
        f"GRPOConfig ok: {real.num_generations} generations, batch {real.generation_batch_size}, "
        f"lr {real.learning_rate}, beta {real.beta}, use_vllm {real.use_vllm}"
    )
    data = load_trl_dataset(root)
    rows = [r for split in data for r in data[split]]
    with tempfile.TemporaryDirectory(prefix="guardstream-dry-run-") as tmp:
        tok = tiny_policy(Path(tmp) / "policy", [m["content"] for r in rows for m in r["prompt"]])
        for r in rows:  # every prompt through TRL's message preparation and the chat template
            images = r["images"] or []
            msgs = prepare_multimodal_messages(r["prompt"], images=images)
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            want = render_qwen2_5_vl(r["prompt"][0]["content"], r["prompt"][1]["content"], len(images))
            if text != want:
                raise ValueError(
                    f"{r['extra_info']['post_id']}: TRL renders a different prompt than the engines"
                )
        texts = [r for r in rows if not r["images"]]
        steps: dict[str, dict[str, float]] = {}
        if texts:
            steps["text"] = text_step(cfg, data, texts, tok, Path(tmp))
        else:
            console.print("no text-only record: the text GRPO step is skipped")
        vision = [(split, r) for split in data for r in data[split] if r["images"]]
        if vision:
            split, record = vision[0]
            steps["image"] = image_step(cfg, data[split], record, Path(tmp))
            console.print(f"image GRPO step ok: {record['extra_info']['post_id']} on a tiny Qwen2.5-VL")
        else:
            console.print("no image record: the image GRPO step is skipped")
        return steps


def _step_args(cfg: dict[str, Any], tmp: Path, **overrides: Any) -> Any:
    """The configured ``GRPOConfig`` made to run on the CPU in seconds."""
    return grpo_config(
        cfg,
        use_cpu=True,
        bf16=False,
        use_vllm=False,
        max_completion_length=8,
        output_dir=str(tmp / "out"),
        report_to="none",
        save_strategy="no",
        **overrides,
    )


def _reward_means(trainer: Any) -> dict[str, float]:
    means = {
        k.split("/")[1]: float(v[-1])
        for k, v in trainer._metrics["train"].items()
        if k.startswith("rewards/") and k.endswith("/mean")
    }
    return {k: v for k, v in means.items() if k in {f.__name__ for f in make_reward_funcs()}}


def text_step(
    cfg: dict[str, Any], data: Any, texts: list[dict[str, Any]], tok: Any, tmp: Path
) -> dict[str, float]:
    """One GRPO generation-and-scoring step over the text records, with the configured group size, on
    the tiny Qwen2 policy ``tiny_policy`` saved under ``tmp``."""
    GRPOTrainer = _module("trl").GRPOTrainer
    step_args = _step_args(cfg, tmp)
    trainer = GRPOTrainer(
        model=str(tmp / "policy"),
        reward_funcs=make_reward_funcs(floors_of(cfg)),
        args=step_args,
        train_dataset=data["train"].filter(lambda r: not r["images"]),
        processing_class=tok,
    )
    batch = [texts[i % len(texts)] for i in range(step_args.generation_batch_size)]
    batch.sort(key=lambda r: str(r["extra_info"]["post_id"]))  # groups of identical prompts
    trainer.model.train()  # a training step: TRL files its metrics under the mode
    out = trainer._generate_and_score_completions(batch)
    if out["advantages"].shape[0] != len(batch):
        raise ValueError("GRPO step returned the wrong number of advantages")
    return _reward_means(trainer)


def image_step(cfg: dict[str, Any], split: Any, record: dict[str, Any], tmp: Path) -> dict[str, float]:
    """One GRPO generation-and-scoring step on one image record (its ``images`` decoded by
    ``datasets.Image``) through a tiny random Qwen2.5-VL policy and the real Qwen2.5-VL processor:
    TRL's ``prepare_multimodal_messages``, the processor's chat template and image processor, generation
    with ``pixel_values`` through the vision tower, the reference model's log-probs, the rewards. One
    group of 2 generations (the configured 16 over a ~2300-token prompt take over a minute on 2 cores);
    the group size does not change the input path. Raises if the vision inputs TRL returns do not match
    the prompt's image tokens (``vision_problems``)."""
    GRPOTrainer = _module("trl").GRPOTrainer
    processor = tiny_vl_policy(tmp / "vl-policy")
    step_args = _step_args(
        cfg, tmp, num_generations=2, per_device_train_batch_size=2, gradient_accumulation_steps=1
    )
    trainer = GRPOTrainer(
        model=str(tmp / "vl-policy"),
        reward_funcs=make_reward_funcs(floors_of(cfg)),
        args=step_args,
        train_dataset=split.filter(lambda imgs: bool(imgs), input_columns=["images"]),
        processing_class=processor,
    )
    batch = [record] * step_args.generation_batch_size
    trainer.model.train()
    out = trainer._generate_and_score_completions(batch)
    if out["advantages"].shape[0] != len(batch) or out["completion_ids"].shape[0] != len(batch):
        raise ValueError("image GRPO step returned the wrong number of completions")
    ids = [row[mask.bool()].tolist() for row, mask in zip(out["prompt_ids"], out["prompt_mask"], strict=True)]
    problems = vision_problems(ids, out["image_grid_thw"], out["pixel_values"], out["num_images"], processor)
    if problems:
        raise ValueError(f"{record['extra_info']['post_id']}: TRL's vision inputs are wrong: {problems}")
    return _reward_means(trainer)


def dry_run(cfg: dict[str, Any], console: Console, limit: int = 8, trl: bool = True) -> int:
    root = Path(cfg["dataset_dir"])
    fmt = export_format(root)
    if fmt != "trl":
        console.print(
            f"[red]{root} is a {fmt} export[/]: this launcher trains with TRL (export with --format trl); "
            "a verl export is for ProGuard's own trainer (train/proguard-train.sh)"
        )
        return 1
    splits = {s: load_split(root / f"{s}.jsonl") for s in ("train", "validation")}
    if not splits["train"]:  # an empty dataset would "pass" every check below; it is a failure
        console.print(
            f"[red]no training records[/] in {root / 'train.jsonl'}: export some first "
            "(guardstream export-training --out DIR) and pass --dataset-dir DIR"
        )
        return 1
    problems = [p for recs in splits.values() for p in validate(recs, root)]
    console.print(f"dataset {root}: " + ", ".join(f"{k}={len(v)}" for k, v in splits.items()))
    for p in problems[:20]:
        console.print(f"[red]problem[/] {p}")
    console.print(reward_table(splits, cfg, limit))
    if problems or not trl:
        return 1 if problems else 0
    try:
        import datasets  # noqa: F401
        import trl as _trl  # noqa: F401
    except ImportError:
        console.print("[yellow]TRL check skipped[/]: install the train extra (pip install -e '.[train]')")
        return 0
    steps = trl_dry_run(cfg, root, console)
    for name, means in steps.items():
        console.print(
            f"GRPO {name} step on a tiny policy, mean rewards: " + json.dumps(means), soft_wrap=True
        )
    return 0


def train(cfg: dict[str, Any]) -> int:  # pragma: no cover - needs GPUs and the weights
    GRPOTrainer = _module("trl").GRPOTrainer
    root = Path(cfg["dataset_dir"])
    data = load_trl_dataset(root)
    args = grpo_config(cfg)
    trainer = GRPOTrainer(
        model=cfg["model"],
        reward_funcs=make_reward_funcs(floors_of(cfg)),
        args=args,
        train_dataset=filter_overlong(data["train"], trainer_tokenizer(cfg), cfg["max_prompt_length"]),
        eval_dataset=data.get("validation"),
    )
    trainer.train()
    trainer.save_model(cfg["output_dir"])
    return 0


def trainer_tokenizer(cfg: dict[str, Any]) -> Any:  # pragma: no cover - needs the weights
    return _module("transformers").AutoProcessor.from_pretrained(cfg["model"])


def filter_overlong(dataset: Any, processor: Any, max_len: int) -> Any:  # pragma: no cover - needs weights
    """verl's ``filter_overlong_prompts``: drop prompts longer than ``max_len`` tokens (text only; an
    image at ``max_pixels`` adds at most 1280 visual tokens — ProGuard's data uses 3072 in all)."""
    tok = getattr(processor, "tokenizer", processor)

    def fits(r: dict[str, Any]) -> bool:
        text = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        return len(tok(text)["input_ids"]) <= max_len

    return dataset.filter(fits)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).with_name("grpo.yaml")))
    ap.add_argument("--dataset-dir", help="override dataset_dir from the config")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--no-trl", action="store_true", help="dry run: skip the TRL step")
    a = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(a.config).read_text())
    if a.dataset_dir:
        cfg["dataset_dir"] = a.dataset_dir
    console = Console(width=160)
    return dry_run(cfg, console, trl=not a.no_trl) if a.dry_run else train(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
