"""The transformers engine decodes from the checkpoint's generation_config and reads P(unsafe) from the
raw logits. Model and processor are recording stand-ins (no weights on CI); tensors and
``GenerationConfig`` are transformers' and torch's own."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import GenerationConfig

from guard.hf_engine import TransformersConfig, TransformersEngine, dtype_kwargs
from guard.prompts import PromptSet
from guard.types import ModerationItem

# Qwen-style split of the answer (":" before "unsafe", ":s" + "afe" for "safe")
ANSWER = [
    "<think>", "\n", "bad", "\n", "</think>", "\n", "<answer>", "\n", "Request", ":", "unsafe", "\n",
    "Response", ":s", "afe", "\n", "Category", ":C", "9", "S", "1", "\n", "</answer>",
]  # fmt: skip
VOCAB = [*sorted(set(ANSWER)), "<eos>", "<pad>"]
ID = {t: i for i, t in enumerate(VOCAB)}


class Inputs(dict[str, Any]):
    def to(self, device: Any) -> Inputs:
        return self


class Tokenizer:
    padding_side = "right"
    eos_token_id = ID["<eos>"]
    pad_token_id = ID["<pad>"]

    def decode(self, ids: list[int]) -> str:
        return "".join(VOCAB[i] for i in ids if VOCAB[i] not in ("<eos>", "<pad>"))


class Processor:
    def __init__(self) -> None:
        self.tokenizer = Tokenizer()

    def __call__(self, text: list[str], images: Any, padding: bool, return_tensors: str) -> Inputs:
        return Inputs(input_ids=torch.zeros((len(text), 3), dtype=torch.long))

    def batch_decode(self, seqs: torch.Tensor, skip_special_tokens: bool) -> list[str]:
        return [self.tokenizer.decode(row.tolist()) for row in seqs]


class Model:
    device = "cpu"

    def __init__(self, p_unsafe: float) -> None:
        # what a Qwen2.5-VL checkpoint ships: sampling defaults and a repetition penalty
        self.generation_config = GenerationConfig(
            do_sample=True, temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05
        )
        self.p = p_unsafe
        self.calls: list[dict[str, Any]] = []

    def generate(self, **kw: Any) -> SimpleNamespace:
        self.calls.append(kw)
        n = kw["input_ids"].shape[0]
        ids = [ID[t] for t in ANSWER] + [ID["<eos>"]]
        logits, scores = [], []
        for tid in ids:
            raw = torch.full((n, len(VOCAB)), -30.0)
            raw[:, tid] = 0.0
            if VOCAB[tid] == ":" and ANSWER[ids.index(tid) + 1] == "unsafe":
                raw[:, ID[":"]] = math.log(self.p)
                raw[:, ID[":s"]] = math.log(1 - self.p)
            processed = raw.clone()
            processed[:, ID[":s"]] = processed[:, ID[":"]]  # penalties/warpers reshape the distribution
            logits.append(raw)
            scores.append(processed)
        seq = torch.cat([kw["input_ids"], torch.tensor([ids] * n)], dim=1)
        return SimpleNamespace(sequences=seq, logits=tuple(logits), scores=tuple(scores))


@pytest.mark.parametrize("p", [0.2, 0.7])
def test_generation_starts_from_the_checkpoints_config_and_reads_raw_logits(
    prompts: PromptSet, p: float
) -> None:
    model = Model(p)
    eng = TransformersEngine(prompts, TransformersConfig(max_tokens=64), model=model, processor=Processor())
    (v,) = eng.moderate([ModerationItem("a", "some text")])
    assert (v.safe, v.subcategory) == (False, "C9S1")
    assert v.p_unsafe == pytest.approx(p)  # the processed scores would say 0.5
    (kw,) = model.calls
    cfg = kw["generation_config"]
    assert cfg is not model.generation_config  # a copy: the model's own config is left alone
    assert (cfg.repetition_penalty, cfg.top_p, cfg.top_k) == (1.05, 0.001, 1)
    assert kw["do_sample"] is False and kw["max_new_tokens"] == 64
    assert kw["output_logits"] is True and kw["return_dict_in_generate"] is True
    assert "output_scores" not in kw and "temperature" not in kw


def test_sampling_overrides_only_the_temperature(prompts: PromptSet) -> None:
    model = Model(0.5)
    eng = TransformersEngine(prompts, TransformersConfig(temperature=0.7), model=model, processor=Processor())
    kw = eng.generate_kwargs()
    assert kw["do_sample"] is True and kw["temperature"] == 0.7
    assert kw["generation_config"].repetition_penalty == 1.05


def test_dtype_keyword_follows_the_transformers_version() -> None:
    assert dtype_kwargs("5.17.0", torch.bfloat16) == {"dtype": torch.bfloat16}
    assert dtype_kwargs("4.56.0", "x") == {"dtype": "x"}
    assert dtype_kwargs("4.55.4", "x") == {"torch_dtype": "x"}
    assert dtype_kwargs("4.44.0.dev0", "x") == {"torch_dtype": "x"}


def test_top_logprobs_matches_a_per_row_reference() -> None:
    """The vectorised extraction (one top-k per step, one host transfer) gives what a per-row, per-step
    log-softmax gives: same values, same ids, laid out [row][step][k]."""
    import torch

    from guard.hf_engine import _top_logprobs

    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(3, 50, generator=g) for _ in range(4)]
    vals, ids = _top_logprobs(steps, 5)
    assert len(vals) == 3 and all(len(r) == 4 for r in vals)
    for row in range(3):
        for step, logits in enumerate(steps):
            ref_v, ref_i = torch.log_softmax(logits[row], dim=-1).topk(5)
            assert ids[row][step] == ref_i.tolist()
            assert vals[row][step] == pytest.approx(ref_v.tolist(), abs=1e-6)
    assert _top_logprobs([], 5) == ([], [])
