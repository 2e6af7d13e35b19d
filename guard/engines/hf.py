"""ProGuard through Hugging Face ``transformers`` (a dev GPU without vLLM). Same prompts as the vLLM
engine (Qwen2.5-VL chat template, one image per request), greedy decoding, ``max_new_tokens`` 1024.

Decoding starts from the checkpoint's ``generation_config`` (its repetition penalty, top-p/top-k), as
``vllm serve`` — ProGuard's deploy path — does, and overrides only temperature (0: greedy), the token
budget and the logprob outputs. P(unsafe) is read from the raw logits (``output_logits``): the
processed ``scores`` have the repetition penalty (and, when sampling, temperature/top-k/top-p masks)
applied, which distorts the label probabilities. Loading uses ``dtype=`` (transformers ≥ 4.56, PR
#39782), ``torch_dtype=`` on older versions.

Slower than vLLM (static batches, no paged attention or prefix cache); use it to debug prompts or
compare outputs. Model and processor are injectable for tests.

Failures (``classify_failure``; the engine sits behind ``guard.streaming.MicroBatcher``):

- **the device is gone** → ``EngineDeadError``, which the MicroBatcher hands to every request of the
  batch without re-running any, and the worker holds them (never a dead letter; exit 3 past
  ``ENGINE_DEADLINE_S``): ``torch.AcceleratorError`` (torch ≥ 2.8: "CUDA error: an illegal memory
  access", "device-side assert triggered" — sticky, the CUDA context is unusable until the process
  restarts), ``torch.distributed.DistBackendError`` (NCCL), and on older torch a ``RuntimeError`` whose
  message starts with "CUDA error", "CUDA driver", "cuDNN error" or names NCCL/CUBLAS — looked for
  along the exception's cause/context chain too (CUDA errors surface asynchronously, at the next
  synchronising call, which may be inside the processor, ``generate`` or the host transfer).
- **out of memory** (``torch.OutOfMemoryError``, "CUDA error: out of memory") on a batch of several →
  a plain ``EngineError`` after ``torch.cuda.empty_cache()``: a batch-size problem, so the MicroBatcher
  re-runs the batch item by item, and one item alone fits where 32 did not. OOM on **one** item is that
  item's ``EngineRequestError`` (its prompt or image is what does not fit: its neighbours ran) — unless
  the engine has not completed anything since the previous lone-item OOM: two single items in a row that
  cannot fit say the device has no room for any request (another process holds the memory, the model
  is too big for the card) → ``EngineDeadError``, no post blamed.
- **anything else** (the processor refusing an input, a shape error) → ``EngineError`` for the batch:
  re-run item by item, so only the item that fails alone fails.
"""

from __future__ import annotations

import copy
from typing import Any

from guard.chat import combine, expand, p_unsafe_from_logprobs, render, render_qwen2_5_vl, user_text
from guard.config import TransformersConfig as TransformersConfig
from guard.errors import EngineDeadError, EngineError, EngineRequestError
from guard.parser import parse_output
from guard.prompts import PromptSet
from guard.types import ModerationItem, Verdict
from schemas.events import Modality

DTYPE_KWARG_SINCE = (4, 56)  # transformers PR #39782 renamed from_pretrained's torch_dtype to dtype


def dtype_kwargs(transformers_version: str, dtype: Any) -> dict[str, Any]:
    """``{"dtype": dtype}`` on transformers ≥ 4.56, ``{"torch_dtype": dtype}`` before."""
    parts = tuple(int(x) for x in transformers_version.split(".")[:2] if x.isdigit())
    return {"dtype": dtype} if parts >= DTYPE_KWARG_SINCE else {"torch_dtype": dtype}


class TransformersEngine:
    name = "proguard-transformers"

    def __init__(
        self,
        prompts: PromptSet,
        config: TransformersConfig | None = None,
        model: Any = None,
        processor: Any = None,
    ) -> None:
        self.config = c = config or TransformersConfig()
        self.prompts = prompts
        self.taxonomy = prompts.taxonomy
        self.policy_version = prompts.policy_version
        self.model_version = f"{c.model}@transformers"
        if model is None or processor is None:
            import torch
            import transformers
            from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

            processor = AutoProcessor.from_pretrained(  # type: ignore[no-untyped-call]
                c.model, min_pixels=c.min_pixels, max_pixels=c.max_pixels
            )
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                c.model,
                device_map=c.device_map,
                **dtype_kwargs(transformers.__version__, getattr(torch, c.dtype)),
            ).eval()  # type: ignore[no-untyped-call]
        processor.tokenizer.padding_side = "left"  # decoder-only batch generation
        self.model, self.processor = model, processor
        self._lone_oom = False  # a single item ran out of memory and nothing has completed since

    def build_inputs(self, items: list[ModerationItem]) -> tuple[list[str], list[Any]]:
        texts: list[str] = []
        images: list[Any] = []
        for it in items:
            r = render(self.prompts, it)
            texts.append(render_qwen2_5_vl(r.system, user_text(r), len(it.images)))
            images.extend(it.images)
        return texts, images

    def generate_kwargs(self) -> dict[str, Any]:
        """The checkpoint's ``generation_config`` with only temperature, the token budget and the
        outputs overridden (keyword arguments to ``generate`` take precedence over the config)."""
        c = self.config
        base = getattr(self.model, "generation_config", None)
        kw: dict[str, Any] = {
            "generation_config": copy.deepcopy(base) if base is not None else None,
            "max_new_tokens": c.max_tokens,
            "do_sample": c.temperature > 0,
            "output_logits": True,  # raw logits, before repetition penalty / warpers
            "return_dict_in_generate": True,
        }
        if c.temperature > 0:
            kw["temperature"] = c.temperature
        return kw

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        if self.model is None:
            raise EngineDeadError("transformers engine is closed")
        try:
            verdicts = self._moderate(batch)
        except EngineError:
            raise
        except Exception as exc:
            err = classify_failure(exc, len(batch), oom_before=self._lone_oom)
            if is_out_of_memory(exc):
                _empty_cache()
                self._lone_oom = self._lone_oom or len(batch) == 1
            raise err from exc
        self._lone_oom = False  # the device completed a batch: a later lone OOM is that item's again
        return verdicts

    def _moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        import torch

        expanded = expand(batch)
        texts, images = self.build_inputs([it for _, it in expanded])
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        if self.config.temperature > 0:
            torch.manual_seed(self.config.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.generate_kwargs())
        gen = out.sequences[:, inputs["input_ids"].shape[1] :]
        decoded = self.processor.batch_decode(gen, skip_special_tokens=True)
        tok = self.processor.tokenizer
        eos = {tok.eos_token_id, tok.pad_token_id}
        top_vals, top_ids = _top_logprobs(out.logits, self.config.top_logprobs)
        gen_ids = gen.tolist()
        pieces: dict[int, str] = {}

        def piece(tid: int) -> str:
            if tid not in pieces:
                pieces[tid] = tok.decode([tid])
            return pieces[tid]

        parts: list[list[Verdict]] = [[] for _ in batch]
        for row, ((i, it), text) in enumerate(zip(expanded, decoded, strict=True)):
            v = parse_output(text, self.taxonomy, image_only=it.modality is Modality.IMAGE)
            tokens: list[str] = []
            tops: list[dict[str, float]] = []
            for step in range(len(top_vals[row])):
                tid = gen_ids[row][step]
                if tid in eos:
                    break
                tokens.append(piece(tid))
                tops.append(
                    {piece(j): x for x, j in zip(top_vals[row][step], top_ids[row][step], strict=True)}
                )
            v.p_unsafe = p_unsafe_from_logprobs(tokens, tops)
            parts[i].append(v)
        return [combine(p) for p in parts]

    def close(self) -> None:
        self.model = None


# RuntimeError messages of device failures on torch < 2.8 (no AcceleratorError) and of the libraries
# under it; matched at the start ("CUDA error: ...") or anywhere (NCCL, CUBLAS_STATUS_...).
_DEVICE_PREFIXES = ("CUDA error", "CUDA driver", "cuDNN error", "CUDA kernel errors")
_DEVICE_WORDS = ("NCCL", "CUBLAS_STATUS", "device-side assert", "illegal memory access")


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out and len(out) < 16:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    for e in _chain(exc):
        if isinstance(e, torch.OutOfMemoryError):
            return True
        msg = str(e)
        if isinstance(e, RuntimeError) and (
            "CUDA out of memory" in msg or msg.startswith("CUDA error: out of memory")
        ):
            return True
    return False


def is_device_failure(exc: BaseException) -> bool:
    """The accelerator (or the link between accelerators) failed: nothing the input did can be retried."""
    import torch

    dead_types: tuple[type[BaseException], ...] = tuple(
        t for t in (getattr(torch, "AcceleratorError", None), _dist_backend_error()) if isinstance(t, type)
    )
    for e in _chain(exc):
        if dead_types and isinstance(e, dead_types):
            return True
        if isinstance(e, RuntimeError):
            msg = str(e)
            if msg.startswith(_DEVICE_PREFIXES) or any(w in msg for w in _DEVICE_WORDS):
                return True
    return False


def _dist_backend_error() -> type[BaseException] | None:
    try:
        from torch.distributed import DistBackendError
    except ImportError:  # torch built without distributed
        return None
    return DistBackendError


def classify_failure(exc: BaseException, batch_size: int, *, oom_before: bool = False) -> EngineError:
    """What a failure of ``moderate`` on ``batch_size`` items means (see the module docstring)."""
    what = f"transformers generate failed: {type(exc).__name__}: {exc}"[:1000]
    if is_out_of_memory(exc):
        if batch_size > 1:
            return EngineError(f"{what} (a batch of {batch_size}: re-run item by item)")
        if oom_before:
            return EngineDeadError(
                f"{what}: two single requests in a row did not fit in device memory; free the GPU or "
                "lower GUARDSTREAM_VLLM_MAX_PIXELS / GUARDSTREAM_VLLM_MAX_TOKENS"
            )
        return EngineRequestError(f"{what} (this one input does not fit in device memory)")
    if is_device_failure(exc):
        return EngineDeadError(f"{what} (the device failed: restart the worker; check the GPU)")
    return EngineError(what)


def _empty_cache() -> None:
    """Hand the allocator's cached blocks back after an OOM, so the item-by-item re-run has them."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _top_logprobs(step_logits: Any, k: int) -> tuple[list[list[list[float]]], list[list[list[int]]]]:
    """Top-k log-probabilities of every row at every step, as [row][step][k] lists.

    One log-softmax + top-k per step on the logits' device and ONE transfer to the host at the end:
    a per-row, per-step loop with ``float()`` on each value synchronises the GPU batch x steps x k
    times (a batch of 128 generating 512 tokens is 65k syncs and 65k vocab-wide softmaxes)."""
    import torch

    if not step_logits:
        return [], []
    vals, ids = [], []
    for logits in step_logits:
        v, i = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        vals.append(v)
        ids.append(i)
    top_v = torch.stack(vals, dim=1).cpu().tolist()  # [batch, steps, k]
    top_i = torch.stack(ids, dim=1).cpu().tolist()
    return top_v, top_i
