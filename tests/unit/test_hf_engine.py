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

from guard.engines.hf import TransformersConfig, TransformersEngine, dtype_kwargs
from guard.errors import EngineDeadError, EngineError, EngineRequestError
from guard.prompts import PromptSet
from guard.types import ModerationItem, Verdict

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

    from guard.engines.hf import _top_logprobs

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


# ------------------------------------------------------------------------------------------- failures
class FailingModel(Model):
    """Raises ``fail(batch_size)`` (an exception or None) from ``generate``: the exact exception types
    torch raises on a GPU, constructed on CPU."""

    def __init__(self, fail: Any) -> None:
        super().__init__(0.9)
        self.fail = fail
        self.sizes: list[int] = []

    def generate(self, **kw: Any) -> SimpleNamespace:
        n = kw["input_ids"].shape[0]
        self.sizes.append(n)
        exc = self.fail(n, kw)
        if exc is not None:
            raise exc
        return super().generate(**kw)


def judge_all(eng: TransformersEngine, texts: list[str]) -> list[Any]:
    """Every text through the MicroBatcher in one batch (as the worker submits them)."""
    import asyncio

    from guard.streaming import MicroBatcher

    async def main() -> list[Any]:
        mb = MicroBatcher(eng, max_batch_size=len(texts), max_wait_s=1.0)
        return list(
            await asyncio.gather(
                *(mb.judge(ModerationItem(str(i), t)) for i, t in enumerate(texts)), return_exceptions=True
            )
        )

    return asyncio.run(main())


DEVICE_FAILURES = [
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    torch.AcceleratorError("CUDA error: device-side assert triggered"),
    RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously"),
    RuntimeError("CUDA driver error: unknown error"),
    torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, ...)`"),
]


@pytest.mark.parametrize("exc", DEVICE_FAILURES, ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}")
def test_device_failures_are_engine_dead_for_the_whole_batch_without_bisecting(
    prompts: PromptSet, exc: BaseException
) -> None:
    """Before, every failure became a plain EngineError: the MicroBatcher re-ran the batch item by item
    and each post failed alone, i.e. the whole feed dead-lettered ``engine_failed`` by a dead GPU."""
    model = FailingModel(lambda n, kw: exc)
    eng = TransformersEngine(prompts, model=model, processor=Processor())
    res = judge_all(eng, ["a", "b", "c", "d"])
    assert all(type(r) is EngineDeadError for r in res), res
    assert model.sizes == [4], "not re-run item by item"
    assert "restart the worker" in str(res[0]) and type(exc).__name__ in str(res[0])


def test_device_failure_surfacing_outside_generate_is_dead_too(prompts: PromptSet) -> None:
    """CUDA errors are reported at the next synchronising call: here the host-to-device copy, and a
    generic wrapper whose cause is the CUDA error."""

    class BrokenInputs(Inputs):
        def to(self, device: Any) -> Inputs:
            try:
                raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
            except RuntimeError as cuda:
                raise ValueError("could not move the batch") from cuda

    class BrokenProcessor(Processor):
        def __call__(self, text: list[str], images: Any, padding: bool, return_tensors: str) -> Inputs:
            return BrokenInputs(input_ids=torch.zeros((len(text), 3), dtype=torch.long))

    eng = TransformersEngine(prompts, model=Model(0.5), processor=BrokenProcessor())
    with pytest.raises(EngineDeadError):
        eng.moderate([ModerationItem("a", "x"), ModerationItem("b", "y")])


def test_out_of_memory_on_a_batch_is_re_run_item_by_item(prompts: PromptSet) -> None:
    """OOM is a batch-size problem first: one item alone fits where four did not. Every post gets its
    verdict; nothing is dead, nothing is dead-lettered."""
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    model = FailingModel(lambda n, kw: oom if n > 1 else None)
    eng = TransformersEngine(prompts, model=model, processor=Processor())
    res = judge_all(eng, ["a", "b", "c", "d"])
    assert all(isinstance(r, Verdict) and r.safe is False for r in res), res
    assert model.sizes == [4, 1, 1, 1, 1]


def test_out_of_memory_of_one_input_is_that_inputs_own(prompts: PromptSet) -> None:
    """A single item that does not fit while its neighbours run: that request fails, the rest are judged.
    Two single items in a row that do not fit (nothing completed in between): the device has no room for
    any request, so no post is blamed."""
    huge = 999

    def fail(n: int, kw: dict[str, Any]) -> BaseException | None:
        if n > 1 or kw["input_ids"].shape[1] == huge:
            return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return None

    class SizedProcessor(Processor):
        def __call__(self, text: list[str], images: Any, padding: bool, return_tensors: str) -> Inputs:
            width = huge if any("HUGE" in t for t in text) else 3
            return Inputs(input_ids=torch.zeros((len(text), width), dtype=torch.long))

    model = FailingModel(fail)
    eng = TransformersEngine(prompts, model=model, processor=SizedProcessor())
    res = judge_all(eng, ["a", "HUGE", "c"])
    assert isinstance(res[0], Verdict) and isinstance(res[2], Verdict), res
    assert type(res[1]) is EngineRequestError and "does not fit" in str(res[1])
    # a device with no room for anything: the first lone item is blamed, the next one says "dead"
    always = FailingModel(lambda n, kw: torch.OutOfMemoryError("CUDA out of memory."))
    eng2 = TransformersEngine(prompts, model=always, processor=Processor())
    first = judge_all(eng2, ["a"])
    second = judge_all(eng2, ["b", "c"])
    assert type(first[0]) is EngineRequestError
    assert all(type(r) is EngineDeadError for r in second), second
    assert "GUARDSTREAM_VLLM_MAX_PIXELS" in str(second[0])


def test_a_per_input_error_fails_only_its_item(prompts: PromptSet) -> None:
    """An error that is not the device's (a shape or value error for one input) stays per item: the
    MicroBatcher isolates it and the others are judged."""

    def fail(n: int, kw: dict[str, Any]) -> BaseException | None:
        return ValueError("Image features and image tokens do not match") if kw.get("bad") else None

    class MarkingProcessor(Processor):
        def __call__(self, text: list[str], images: Any, padding: bool, return_tensors: str) -> Inputs:
            inputs = super().__call__(text, images, padding, return_tensors)
            if any("broken" in t for t in text):
                inputs["bad"] = True
            return inputs

    model = FailingModel(fail)
    eng = TransformersEngine(prompts, model=model, processor=MarkingProcessor())
    res = judge_all(eng, ["a", "broken", "c"])
    assert isinstance(res[0], Verdict) and isinstance(res[2], Verdict), res
    assert type(res[1]) is EngineError and "ValueError" in str(res[1])
