"""GPU proof (issue 20): run the project's ``TransformersEngine`` on a 7B-shaped stand-in and measure it.

ProGuard's weights cannot reach the lent GPU machine, so this builds **Qwen2.5-VL-7B's architecture**
(``guard/data/qwen2_5_vl_7b_config.json``: the published Qwen/Qwen2.5-VL-7B-Instruct config.json, which
ProGuard-7B shares) with **random bf16 weights** created directly on the GPU, a tokenizer built locally
(byte-level BPE trained on the running Python's stdlib sources, padded to Qwen's 151643 regular ids, with
Qwen's special tokens at their published ids) and the real Qwen2.5-VL processor classes with the engine's
min/max pixels. Outputs are meaningless (parse errors are expected and counted); shapes, memory and
compute are a 7B VLM's.

Output lengths are forced per request: every request's length is drawn once from a lognormal long tail
(median ``--median-tokens``, capped at ``--max-tokens``), seeded by a hash of the request's prompt tokens,
so the same post gets the same length in every batch size and in continuous batching. A logits processor
forbids EOS before that step and forces it at that step (``min_new_tokens == max_new_tokens`` per row,
which ``generate`` only offers per batch). A static batch therefore runs until its longest row ends, as a
real one does.

Run on the device (writes at most 6 files to ``--out`` as it goes, so a timeout keeps partial results)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/pydeps .whl/gpu/*.whl  # pydantic & co.
    PYTHONPATH=/tmp/pydeps HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 timeout 420 \
        python3 -m guard.gpu_proof --out "$OUT" --budget-s 330

``--tiny`` runs the same code path with a 2-layer config on CPU in well under a minute (the test suite
does this so the script cannot rot without CI noticing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from guard.engines.hf import TransformersConfig, TransformersEngine
from guard.prompts import PromptSet
from guard.streaming import MicroBatcher
from guard.taxonomy import Taxonomy
from guard.types import ModerationItem, Verdict

CONFIG_7B = Path(__file__).resolve().parent / "data" / "qwen2_5_vl_7b_config.json"
N_REGULAR = 151643  # Qwen2's byte-level BPE has ids 0..151642; the special tokens follow
# Qwen2.5-VL's special tokens in id order from 151643 (tokenizer_config.json "added_tokens_decoder").
SPECIAL_TOKENS = (
    "<|endoftext|>",  # 151643, also the pad token
    "<|im_start|>",  # 151644
    "<|im_end|>",  # 151645, the chat EOS
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",  # 151652
    "<|vision_end|>",  # 151653
    "<|vision_pad|>",  # 151654
    "<|image_pad|>",  # 151655
    "<|video_pad|>",  # 151656
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# Qwen2.5-VL's preprocessor_config.json (CLIP mean/std, 14px patches, 2x2 merge, 2 frames per patch).
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# The --tiny model: same classes, same special ids and vocab size (so the processor and the engine
# see the real id layout), 2 text layers, a 2-block vision tower.
TINY_OVERRIDES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2 = 8
    "vision_config": {
        "depth": 2,
        "hidden_act": "silu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_chans": 3,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}

_VOCAB = (
    "the a my your this that new old great terrible selling buying free cheap today tomorrow please "
    "look at check out photo picture garden dog cat car house phone game movie music friend family "
    "love hate kill buy sell drug weapon money bank card account password click link here now "
    "meeting school work office doctor hospital recipe dinner lunch coffee travel trip beach city "
    "politics vote news report story video stream live chat group community rules help question"
)
WORDS = tuple(_VOCAB.split())


@dataclass(frozen=True)
class Plan:
    """What to measure: batch sizes, batches per size, and the forced length distribution."""

    tiny: bool
    batch_sizes: tuple[int, ...]
    batches_per_size: dict[int, int]
    median_tokens: int
    sigma: float
    max_tokens: int
    min_tokens: int
    cb_requests: int
    image_sizes: tuple[tuple[int, int], ...]
    corpus_chars: int


def make_plan(a: argparse.Namespace) -> Plan:
    if a.tiny:
        return Plan(
            tiny=True,
            batch_sizes=(2, 4),
            batches_per_size={2: 1, 4: 1},
            median_tokens=a.median_tokens or 8,
            sigma=0.6,
            max_tokens=a.max_tokens or 24,
            min_tokens=2,
            cb_requests=4,
            image_sizes=((56, 56), (224, 160), (320, 240)),
            corpus_chars=400_000,
        )
    return Plan(
        tiny=False,
        batch_sizes=(8, 32, 128),
        batches_per_size={8: 2, 32: 1, 128: 1},  # ~6 minutes of GPU in all
        median_tokens=a.median_tokens or 150,
        sigma=0.6,
        max_tokens=a.max_tokens or 512,
        min_tokens=8,
        cb_requests=128,
        # small, phone-photo, landscape HD, a tall screenshot, one far above max_pixels (downscaled)
        image_sizes=((224, 224), (640, 480), (1280, 720), (480, 1440), (2400, 1800)),
        corpus_chars=12_000_000,
    )


# ---------------------------------------------------------------------------------------------------
# Output files (at most 6 come back from the device): progress.log, results.json, summary.md,
# nvidia_smi.csv, samples.txt, and error.txt when something raised.


class Out:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"rows": [], "errors": []}
        self._log = (root / "progress.log").open("a", encoding="utf-8")
        self.t0 = time.perf_counter()

    def log(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def save(self) -> None:
        (self.root / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.root / "summary.md").write_text(summary_markdown(self.results))

    def error(self, where: str, exc: BaseException) -> None:
        self.results["errors"].append({"where": where, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        with (self.root / "error.txt").open("a", encoding="utf-8") as f:
            f.write(f"== {where}\n{traceback.format_exc()}\n")
        self.log(f"ERROR in {where}: {type(exc).__name__}: {str(exc)[:300]}")
        self.save()

    @contextlib.contextmanager
    def library_errors(self, where: str, logger: str = "transformers") -> Iterator[None]:
        """Save what ``logger`` reports at ERROR while a phase runs. transformers' continuous batching
        runs generation in a thread that logs its exception instead of raising it, so without this the
        saved files only show the budget guard's timeout (as in run 1 on the H200)."""
        out = self

        class _Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                text = self.format(record)
                with (out.root / "error.txt").open("a", encoding="utf-8") as f:
                    f.write(f"== {where} ({record.name} log)\n{text}\n")
                out.results["errors"].append(
                    {"where": f"{where} ({record.name} log)", "error": record.getMessage()[:2000]}
                )
                out.log(f"{record.name} ERROR during {where}: {record.getMessage()[:300]}")

        handler = _Keep(logging.ERROR)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log = logging.getLogger(logger)
        log.addHandler(handler)
        try:
            yield
        finally:
            log.removeHandler(handler)

    def sample(self, text: str) -> None:
        with (self.root / "samples.txt").open("a", encoding="utf-8") as f:
            f.write(text + "\n")


def summary_markdown(r: dict[str, Any]) -> str:
    env = r.get("env", {})
    model = r.get("model", {})
    lines = [
        "# guardstream GPU proof: Qwen2.5-VL-7B-shaped stand-in, random bf16 weights (outputs meaningless)",
        "",
        f"device: {env.get('device')} | torch {env.get('torch')} | transformers {env.get('transformers')} "
        f"| python {env.get('python')} | {env.get('date')}",
        f"model: {model.get('params_b', '?')} B params, init {model.get('init_s', '?')} s;"
        f" tokenizer built in {r.get('tokenizer', {}).get('build_s', '?')} s "
        f"({r.get('tokenizer', {}).get('system_prompt_tokens', '?')} system-prompt tokens)",
        f"forced output lengths: {r.get('lengths', '')}",
        "",
        "| " + " | ".join(label for _, label in _COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    for row in r.get("rows", []):
        lines.append("| " + " | ".join(str(row.get(k, "")) for k, _ in _COLUMNS) + " |")
    for k in ("e2e", "continuous_batching", "streaming_seam"):
        if k in r:
            lines += ["", f"{k}: {json.dumps(r[k], default=str)}"]
    for e in r.get("errors", []):
        lines += ["", f"ERROR {e['where']}: {e['error'][:500]}"]
    return "\n".join(lines) + "\n"


_COLUMNS = (
    ("run", "run"),
    ("mix", "mix"),
    ("batch", "batch"),
    ("posts", "posts"),
    ("wall_s", "wall s"),
    ("posts_per_s", "posts/s"),
    ("gen_tokens_per_s", "gen tok/s"),
    ("processor_s", "processor s"),
    ("generate_s", "generate s"),
    ("postproc_s", "decode+logprobs s"),
    ("prompt_tokens_per_post", "prompt tok/request"),
    ("peak_gib", "peak GiB"),
    ("gpu_util", "GPU util %"),
    ("parse_errors", "parse errors"),
)


# ---------------------------------------------------------------------------------------------------
# GPU utilisation: nvidia-smi samples every 500 ms into a CSV; each measurement averages its window.


class Smi:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        self._f = path.open("wb")
        self.proc = subprocess.Popen(
            [
                exe,
                "--query-gpu=timestamp,utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "500",
            ],
            stdout=self._f,
            stderr=subprocess.DEVNULL,
        )

    def mean_util(self, start: datetime, end: datetime) -> tuple[float | None, float | None]:
        """Mean GPU utilisation (%) and max memory used (MiB) over samples taken in [start, end]."""
        if self.proc is None:
            return None, None
        self._f.flush()
        util: list[float] = []
        mem: list[float] = []
        for line in self.path.read_text(errors="ignore").splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 3:
                continue
            try:
                ts = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
                u, m = float(parts[1]), float(parts[2])
            except ValueError:
                continue
            if start <= ts <= end:
                util.append(u)
                mem.append(m)
        if not util:
            return None, None
        return round(sum(util) / len(util), 1), max(mem)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            self._f.close()


# ---------------------------------------------------------------------------------------------------
# Tokenizer, processor, model


def build_tokenizer(corpus_chars: int) -> tuple[Any, dict[str, int]]:
    """Byte-level BPE trained on the running Python's stdlib sources (English docstrings and code, ~3.8
    characters per token on our system prompt, near a real Qwen tokenizer's), padded with unreachable
    filler entries to Qwen's 151643 regular ids, then Qwen's special tokens at 151643.."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts: list[str] = []
    n = 0
    # The stdlib first; an image that ships it without sources falls back to transformers' own sources
    # (code-heavier: ~7% more tokens on our system prompt).
    for root in (Path(sysconfig.get_paths()["stdlib"]), Path(transformers.__file__).parent):
        for p in sorted(root.rglob("*.py")):
            if n >= corpus_chars:
                break
            rel = p.relative_to(root).parts
            if "test" in rel or "tests" in rel or "site-packages" in rel:
                continue
            s = p.read_text(encoding="utf-8", errors="ignore")
            texts.append(s)
            n += len(s)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=N_REGULAR, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trained.train_from_iterator(texts, trainer)
    spec = json.loads(trained.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    trained_vocab = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]]
    # No merge produces "<unused_i>" as one token, so these ids are never emitted by encoding; a random
    # model may still generate them and they decode to their text.
    for i in range(len(vocab), N_REGULAR):
        vocab[f"<unused_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != N_REGULAR + i:
            raise RuntimeError(f"special token {t} landed at id {tok.token_to_id(t)}, want {N_REGULAR + i}")
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    return fast, {"corpus_chars": n, "trained_vocab": trained_vocab}


def build_processor(tokenizer: Any, engine_cfg: TransformersConfig) -> Any:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor(
        min_pixels=engine_cfg.min_pixels,
        max_pixels=engine_cfg.max_pixels,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        video_processor: Any = Qwen2VLVideoProcessor()
    except ImportError:
        # Without torchvision (this repo's CPU venv) the video processor cannot be built, but the
        # processor insists on one and only uses it for videos, which guardstream never sends: an
        # uninitialised instance passes its type check. The device has torchvision and gets the real one.
        # (``transformers.BaseVideoProcessor`` is then its dummy class, which is what the check uses).
        import transformers

        video_processor = object.__new__(transformers.BaseVideoProcessor)
    return Qwen2_5_VLProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor
    )


def model_config(tiny: bool) -> Any:
    from transformers import Qwen2_5_VLConfig

    d = json.loads(CONFIG_7B.read_text())
    d.pop("_source", None)
    if tiny:
        d.update(TINY_OVERRIDES)
    return Qwen2_5_VLConfig(**d)


def build_model(tiny: bool, device: str) -> tuple[Any, float]:
    """Random weights created on the target device in bf16 (no CPU copy, no checkpoint)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = model_config(tiny)
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(  # type: ignore[no-untyped-call]
            cfg, dtype=torch.bfloat16
        )
    model.eval()
    gc = model.generation_config
    gc.eos_token_id = [151645, 151643]
    gc.pad_token_id = 151643
    gc.do_sample = False
    gc.temperature = gc.top_p = gc.top_k = None
    _sync(device)
    return model, time.perf_counter() - t0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# Forced output lengths


def forced_length(key: bytes, plan: Plan) -> int:
    """Lognormal(log median, sigma) draw seeded by ``key``, clipped to [min_tokens, max_tokens]."""
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    z = float(np.random.default_rng(seed).standard_normal())
    n = round(plan.median_tokens * math.exp(plan.sigma * z))
    return max(plan.min_tokens, min(plan.max_tokens, n))


def prompt_key(ids: Any) -> bytes:
    return np.asarray(ids, dtype=np.int64).tobytes()


class ForcedLength:
    """Logits processor: row i may not emit EOS before its ``lengths[i]``-th new token and must emit it
    there (so every row generates exactly ``lengths[i]`` tokens, the last one EOS)."""

    def __init__(self, prompt_len: int, lengths: list[int], eos_id: int, device: Any) -> None:
        import torch

        self.prompt_len = prompt_len
        self.lengths = torch.tensor(lengths, device=device)
        self.eos_id = eos_id
        self.banned = torch.tensor([151643, 151645], device=device)  # <|endoftext|>, <|im_end|>

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        step = input_ids.shape[1] - self.prompt_len  # tokens generated so far
        last = self.lengths - 1 == step
        early = ~last
        scores[early.nonzero().flatten()[:, None], self.banned] = float("-inf")
        if bool(last.any()):
            rows = last.nonzero().flatten()
            scores[rows] = float("-inf")
            scores[rows, self.eos_id] = 0.0
        return scores


@dataclass
class GenStats:
    calls: int = 0
    rows: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    padded_steps: int = 0
    generate_s: float = 0.0
    processor_s: float = 0.0
    lengths: list[int] = field(default_factory=list)


class ForcedLengthModel:
    """Wraps the HF model for ``TransformersEngine``: adds the forced-length logits processor per call
    and times ``generate`` alone (the rest of ``moderate`` is processor + decode + logprob extraction)."""

    def __init__(self, model: Any, plan: Plan, device: str) -> None:
        self.model = model
        self.plan = plan
        self.dev = device
        self.stats = GenStats()

    @property
    def device(self) -> Any:
        return self.model.device

    def generate(self, **kw: Any) -> Any:
        from transformers import LogitsProcessorList

        ids, mask = kw["input_ids"], kw["attention_mask"]
        lengths = [
            forced_length(prompt_key(row[m.bool()].tolist()), self.plan)
            for row, m in zip(ids.cpu(), mask.cpu(), strict=True)
        ]
        kw["logits_processor"] = LogitsProcessorList(
            [ForcedLength(ids.shape[1], lengths, 151645, ids.device)]
        )
        kw["max_new_tokens"] = max(lengths)
        _sync(self.dev)
        t0 = time.perf_counter()
        out = self.model.generate(**kw)
        _sync(self.dev)
        s = self.stats
        s.generate_s += time.perf_counter() - t0
        s.calls += 1
        s.rows += len(lengths)
        s.prompt_tokens += int(mask.sum())
        s.new_tokens += sum(lengths)
        s.padded_steps += max(lengths) * len(lengths)
        s.lengths += lengths
        got = out.sequences.shape[1] - ids.shape[1]
        if got != max(lengths):
            raise RuntimeError(f"forced length not honoured: generated {got} steps, wanted {max(lengths)}")
        return out


class TimedProcessor:
    """The processor as the engine sees it (``__call__``, ``tokenizer``, ``batch_decode``), with the
    ``__call__`` (tokenising, image resizing and patching: CPU work before the GPU sees the batch) timed
    into the model wrapper's stats."""

    def __init__(self, processor: Any, wrapped: ForcedLengthModel) -> None:
        self.processor = processor
        self.wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.processor(*args, **kw)
        finally:
            self.wrapped.stats.processor_s += time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------
# Posts


def image(i: int, size: tuple[int, int]) -> Image.Image:
    """A deterministic RGB image with structure (gradients + noise blocks), not a flat colour."""
    w, h = size
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * (i % 7 + 1)) % 256, (y * (i % 5 + 1)) % 256, ((x + y) * 3) % 256], -1)
    noise = rng.integers(0, 64, size=(h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    return Image.fromarray(((base + noise) % 256).astype(np.uint8), "RGB")


def post_text(i: int) -> str:
    rng = np.random.default_rng(10_000 + i)
    n = int(min(300, max(3, rng.lognormal(math.log(25), 0.9))))  # words: short posts, a long tail
    return " ".join(rng.choice(WORDS, n))


def make_posts(mix: str, n: int, start: int, plan: Plan) -> list[ModerationItem]:
    out: list[ModerationItem] = []
    for k in range(n):
        i = start + k
        size = plan.image_sizes[i % len(plan.image_sizes)]
        if mix == "text":
            out.append(ModerationItem(f"{mix}-{i}", post_text(i)))
        elif i % 2:  # image mix: half image-only, half text+image, every image size
            out.append(ModerationItem(f"{mix}-{i}", None, (image(i, size),)))
        else:
            out.append(ModerationItem(f"{mix}-{i}", post_text(i), (image(i, size),)))
    return out


def e2e_posts(plan: Plan) -> list[ModerationItem]:
    """Every shape the engine must handle in one batch: text, image-only, text+image at each size, a
    tiny image (upscaled to min_pixels), and a two-image post (expanded to two requests, combined)."""
    posts = [ModerationItem("e2e-text-short", "hi"), ModerationItem("e2e-text-long", post_text(7) * 3)]
    for j, size in enumerate(plan.image_sizes):
        posts.append(ModerationItem(f"e2e-img-{size[0]}x{size[1]}", None, (image(100 + j, size),)))
        posts.append(ModerationItem(f"e2e-txtimg-{size[0]}x{size[1]}", post_text(j), (image(200 + j, size),)))
    posts.append(ModerationItem("e2e-img-20x20", None, (image(300, (20, 20)),)))
    posts.append(
        ModerationItem("e2e-two-images", "two pictures", (image(301, (224, 224)), image(302, (320, 240))))
    )
    return posts


# ---------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Ctx:
    out: Out
    smi: Smi
    plan: Plan
    device: str
    engine: TransformersEngine
    wrapped: ForcedLengthModel
    deadline: float

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def peak_gib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def allocated_gib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return round(torch.cuda.memory_allocated() / 2**30, 2)


def measure(
    ctx: Ctx, run: str, mix: str, batch: int, posts: list[ModerationItem]
) -> tuple[dict[str, Any], list[Verdict]]:
    """Moderate ``posts`` in static batches of ``batch`` through the engine; one results row."""
    before = ctx.wrapped.stats
    ctx.wrapped.stats = GenStats()
    if ctx.device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    start = datetime.now()
    t0 = time.perf_counter()
    verdicts: list[Verdict] = []
    for i in range(0, len(posts), batch):
        verdicts.extend(ctx.engine.moderate(posts[i : i + batch]))
    wall = time.perf_counter() - t0
    s = ctx.wrapped.stats
    ctx.wrapped.stats = before
    util, mem = ctx.smi.mean_util(start, datetime.now())
    if len(verdicts) != len(posts) or not all(isinstance(v, Verdict) for v in verdicts):
        raise RuntimeError(f"{len(verdicts)} verdicts for {len(posts)} posts")
    row = {
        "run": run,
        "mix": mix,
        "batch": batch,
        "posts": len(posts),
        "requests": s.rows,
        "wall_s": round(wall, 2),
        "posts_per_s": round(len(posts) / wall, 2),
        "gen_tokens": s.new_tokens,
        "gen_tokens_per_s": round(s.new_tokens / wall, 1),
        "padded_decode_rows": s.padded_steps,
        "generate_s": round(s.generate_s, 2),
        "processor_s": round(s.processor_s, 2),
        "postproc_s": round(wall - s.generate_s - s.processor_s, 2),
        "prompt_tokens_per_post": round(s.prompt_tokens / max(1, s.rows)),
        "peak_gib": peak_gib(ctx.device),
        "gpu_util": util,
        "smi_mem_max_mib": mem,
        "parse_errors": sum(v.parse_error for v in verdicts),
        "safe_true_false_none": [
            sum(v.safe is True for v in verdicts),
            sum(v.safe is False for v in verdicts),
            sum(v.safe is None for v in verdicts),
        ],
        "p_unsafe_set": sum(v.p_unsafe is not None for v in verdicts),
    }
    ctx.out.results["rows"].append(row)
    ctx.out.save()
    ctx.out.log(
        f"{run} {mix} batch {batch}: {len(posts)} posts in {wall:.1f}s = {row['posts_per_s']} posts/s, "
        f"{row['gen_tokens_per_s']} gen tok/s (generate {s.generate_s:.1f}s), peak {row['peak_gib']} GiB, "
        f"util {util}%"
    )
    return row, verdicts


def phase_e2e(ctx: Ctx) -> None:
    posts = e2e_posts(ctx.plan)
    row, verdicts = measure(ctx, "e2e-mixed", "all shapes", len(posts), posts)
    ctx.out.results["e2e"] = {
        "posts": len(posts),
        "requests": row["requests"],
        "parse_errors": row["parse_errors"],
        "exceptions": 0,
        "two_image_post_images_judged": verdicts[-1].extra.get("images_judged"),
    }
    for p, v in zip(posts, verdicts, strict=True):
        ctx.out.sample(
            f"{p.post_id}: safe={v.safe} parse_error={v.parse_error} p_unsafe={v.p_unsafe} "
            f"reason={v.extra.get('parse_error_reason')} raw={(v.raw_output or '')[:160]!r}"
        )
    ctx.out.save()


def phase_static(ctx: Ctx, mix: str) -> None:
    """Static batches of each size; a size is skipped when the last smaller size's time says it would
    not finish inside the budget (a batch 4x larger takes well under 4x as long on a GPU)."""
    last = 0.0
    for b in ctx.plan.batch_sizes:
        n = b * ctx.plan.batches_per_size.get(b, 1)
        if last and ctx.left() < last * 1.5:
            ctx.out.log(f"skip static {mix} batch {b}: {ctx.left():.0f}s left, last size took {last:.0f}s")
            ctx.out.results.setdefault("skipped", []).append(f"static {mix} batch {b}")
            continue
        try:
            row, _ = measure(ctx, "static", mix, b, make_posts(mix, n, 1000 * b, ctx.plan))
            last = row["wall_s"]
        except Exception as exc:
            ctx.out.error(f"static {mix} batch {b}", exc)
            _empty_cache(ctx.device)


def phase_streaming(ctx: Ctx) -> None:
    """The worker's seam for batch-native engines: ``MicroBatcher`` over the same engine, posts
    submitted one by one as the worker does (judge per post, many in flight)."""
    b = ctx.plan.batch_sizes[1]
    posts = make_posts("text", 2 * b, 1000 * b, ctx.plan)

    async def go() -> list[Verdict]:
        mb = MicroBatcher(ctx.engine, max_batch_size=b, max_wait_s=0.05)
        vs = await asyncio.gather(*(mb.judge(p) for p in posts))
        mb._closed = True  # do not close the engine itself (aclose would); later phases reuse it
        return list(vs)

    t0 = time.perf_counter()
    vs = asyncio.run(go())
    wall = time.perf_counter() - t0
    ctx.out.results["streaming_seam"] = {
        "engine": "MicroBatcher(TransformersEngine)",
        "max_batch_size": b,
        "posts": len(posts),
        "wall_s": round(wall, 2),
        "posts_per_s": round(len(posts) / wall, 2),
        "parse_errors": sum(v.parse_error for v in vs),
    }
    ctx.out.save()
    ctx.out.log(f"streaming seam (MicroBatcher, batch {b}): {len(posts)} posts in {wall:.1f}s")


def phase_continuous(ctx: Ctx) -> None:
    """transformers' continuous batching (paged KV cache, requests join/leave every step) on the text
    mix, with the same prompts and forced lengths as the static text rows; it takes token ids only, so
    images and the engine's parse path are not in it."""
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    n = ctx.plan.cb_requests
    posts = make_posts("text", n, 1000 * ctx.plan.batch_sizes[-1], ctx.plan)
    texts, _ = ctx.engine.build_inputs(posts)
    tok = ctx.engine.processor.tokenizer
    reqs = [tok(t)["input_ids"] for t in texts]
    lengths = [forced_length(prompt_key(r), ctx.plan) for r in reqs]
    model = ctx.wrapped.model
    gen_cfg = GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False, max_new_tokens=ctx.plan.max_tokens, eos_token_id=151645, pad_token_id=151643
    )
    # On the GPU the cache is sized from free memory (transformers' default); on CPU (--tiny) a small
    # fixed cache, or it would size itself from host RAM and spend a minute allocating it.
    # On the GPU at most half the free memory, so the image rows after it still fit if anything of the
    # cache outlives the manager; the workload hints are what generate_batch would pass.
    cb_cfg = (
        ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=2048, use_cuda_graph=False)
        if ctx.plan.tiny
        else ContinuousBatchingConfig(max_memory_percent=0.5)
    )
    hints = WorkloadHints(
        max_prompt_length=max(len(r) for r in reqs), max_generated_length=max(lengths), num_requests=n
    )
    _empty_cache(ctx.device)  # the static phases' cached blocks would otherwise count as used memory
    if ctx.device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    start = datetime.now()
    t0 = time.perf_counter()
    got: dict[str, int] = {}
    with model.continuous_batching_context_manager(
        generation_config=gen_cfg,
        continuous_batching_config=cb_cfg,
        block=True,
        timeout=30,
        workload_hints=hints,
    ) as mgr:
        t_ready = time.perf_counter()
        ids = [
            mgr.add_request(r, request_id=f"r{i}", max_new_tokens=L, eos_token_id=[])
            for i, (r, L) in enumerate(zip(reqs, lengths, strict=True))
        ]
        while len(got) < len(ids):
            res = mgr.get_result(timeout=1)
            if res is None:
                if not mgr.is_running():
                    raise RuntimeError("continuous batching thread stopped before all requests finished")
                if time.perf_counter() - t0 > max(30.0, ctx.left()):
                    raise TimeoutError("continuous batching ran out of budget")
                continue
            if res.is_finished():
                got[res.request_id] = len(res.generated_tokens)
        t_done = time.perf_counter()
    gen = t_done - t_ready
    peak = peak_gib(ctx.device)
    gc.collect()
    _empty_cache(ctx.device)
    util, _ = ctx.smi.mean_util(start, datetime.now())
    wrong = [k for k, L in zip(ids, lengths, strict=True) if got.get(k) != L]
    ctx.out.results["continuous_batching"] = {
        "requests": n,
        "setup_and_warmup_s": round(t_ready - t0, 2),
        "generate_s": round(gen, 2),
        "requests_per_s": round(n / gen, 2),
        "gen_tokens": sum(lengths),
        "gen_tokens_per_s": round(sum(lengths) / gen, 1),
        "peak_gib": peak,
        "allocated_after_gib": allocated_gib(ctx.device),
        "gpu_util": util,
        "length_mismatches": len(wrong),
        "compare_with": f"static text batch {ctx.plan.batch_sizes[-1]} row (same prompts, same lengths)",
    }
    ctx.out.save()
    ctx.out.log(f"continuous batching: {n} requests in {gen:.1f}s = {n / gen:.2f} req/s")


def _empty_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def env_info(device: str) -> dict[str, Any]:
    import tokenizers
    import torch
    import transformers

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
        "date": datetime.now().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
    }


@contextlib.contextmanager
def timed(out: Out, what: str) -> Iterator[dict[str, float]]:
    rec: dict[str, float] = {}
    t0 = time.perf_counter()
    yield rec
    rec["s"] = round(time.perf_counter() - t0, 2)
    out.log(f"{what}: {rec['s']}s")


def run(a: argparse.Namespace) -> int:
    import torch

    plan = make_plan(a)
    out = Out(Path(a.out))
    deadline = out.t0 + a.budget_s
    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    if not a.tiny and device == "cpu":
        out.log("no CUDA device: the 7B stand-in needs a GPU (use --tiny on CPU)")
        return 2
    out.results["env"] = env_info(device)
    out.results["plan"] = {k: v for k, v in plan.__dict__.items() if k != "corpus_chars"}
    out.results["lengths"] = (
        f"lognormal median {plan.median_tokens}, sigma {plan.sigma}, clipped to "
        f"[{plan.min_tokens}, {plan.max_tokens}], seeded per prompt"
    )
    out.log(f"guard.gpu_proof on {out.results['env']['device']} ({'tiny' if a.tiny else '7B-shaped'})")
    out.save()
    smi = Smi(out.root / "nvidia_smi.csv")
    try:
        engine_cfg = TransformersConfig(model="random-qwen2.5-vl-7b-shaped", max_tokens=plan.max_tokens)
        with timed(out, "tokenizer") as t:
            tokenizer, tok_info = build_tokenizer(plan.corpus_chars)
        prompts = PromptSet(Taxonomy.load())
        sys_tokens = len(tokenizer(prompts.system(next(iter(_modalities()))))["input_ids"])
        out.results["tokenizer"] = {"build_s": t["s"], "system_prompt_tokens": sys_tokens, **tok_info}
        processor = build_processor(tokenizer, engine_cfg)
        model, init_s = build_model(a.tiny, device)
        params = sum(p.numel() for p in model.parameters())
        out.results["model"] = {
            "params_b": round(params / 1e9, 3),
            "init_s": round(init_s, 2),
            "dtype": "bfloat16",
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "weights_gib": peak_gib(device),
        }
        out.log(f"model: {params / 1e9:.2f} B params in {init_s:.1f}s")
        out.save()
        wrapped = ForcedLengthModel(model, plan, device)
        engine = TransformersEngine(
            prompts, engine_cfg, model=wrapped, processor=TimedProcessor(processor, wrapped)
        )
        ctx = Ctx(out, smi, plan, device, engine, wrapped, deadline)
        wanted = {x.strip() for x in a.phases.split(",")}
        if "e2e" in wanted:
            phase_e2e(ctx)  # also the warm-up; any exception here fails the run
        # most wanted first: the budget guard drops whatever is left at the end
        # (name, run, seconds it needs at least on the GPU: CB sets up a paged cache and CUDA graphs)
        phases: list[tuple[str, Callable[[Ctx], None], float]] = [
            ("static text", lambda c: phase_static(c, "text"), 10),
            ("continuous batching", phase_continuous, 60),
            ("static image", lambda c: phase_static(c, "image"), 10),
            ("streaming seam", phase_streaming, 30),
        ]
        for name, fn, need in phases:
            if name not in wanted:
                continue
            if ctx.left() < (0 if plan.tiny else need):
                out.log(f"skip {name}: {ctx.left():.0f}s of the budget left, needs ~{need:.0f}s")
                out.results.setdefault("skipped", []).append(name)
                continue
            try:
                with out.library_errors(name):
                    fn(ctx)
            except Exception as exc:
                out.error(name, exc)
                _empty_cache(device)
    except Exception as exc:
        out.error("setup/e2e", exc)
        return 1
    finally:
        smi.stop()
        out.results["total_s"] = round(time.perf_counter() - out.t0, 1)
        out.save()
    out.log("done")
    return 0


PHASES = ("e2e", "static text", "continuous batching", "static image", "streaming seam")


def _modalities() -> Iterator[Any]:
    from schemas.events import Modality

    yield Modality.TEXT


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the result files (the device's $OUT)")
    ap.add_argument("--tiny", action="store_true", help="2-layer model on CPU: the CI smoke of this script")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip measurements past this many seconds")
    ap.add_argument("--median-tokens", type=int, default=0, help="median forced output length (0: plan's)")
    ap.add_argument("--max-tokens", type=int, default=0, help="cap of the forced output length (0: plan's)")
    ap.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of: {', '.join(PHASES)} (a second device call can finish the rest)",
    )
    sys.exit(run(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
