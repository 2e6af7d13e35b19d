"""ProGuard in-process on vLLM: one ``LLM.generate`` call per micro-batch, images as multi_modal_data.

Written against vLLM's public offline API (``vllm.LLM``, ``vllm.SamplingParams``; version pinned in
the ``gpu`` extra). The LLM and SamplingParams constructors are injectable: CI has no GPU and no weights,
so tests pass recording stand-ins and check the exact arguments (engine kwargs, prompts,
multi_modal_data, sampling params) and the handling of the outputs.

Defaults are for one H100/H200 and ProGuard-7B (Qwen2.5-VL-7B, bf16 ≈ 16 GB of weights):
- ``max_model_len`` 8192: the system prompt is ~700 tokens, an image at ``max_pixels`` 1280·28·28 is
  ≤ 1280 visual tokens, ``max_tokens`` 1024 (ProGuard's inference.py) — ample headroom.
- prefix caching on: every request in a modality shares the long system prompt, so its KV is computed
  once and reused across the batch.
- ``temperature`` 0.0 and ``max_tokens`` 1024 as ProGuard's deploy/inference.py uses.
- ``logprobs`` 5 so P(unsafe) can be read at the ``Request:`` label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from guard.chat import combine, expand, p_unsafe_from_logprobs, render, render_qwen2_5_vl, user_text
from guard.parser import parse_output
from guard.prompts import PromptSet
from guard.types import EngineError, ModerationItem, Verdict
from schemas.events import Modality


@dataclass(frozen=True)
class VllmConfig:
    model: str = "yushaohan/ProGuard-7B"  # a local path (no hub access needed) or a model id
    revision: str | None = None
    dtype: str = "bfloat16"
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.90
    max_num_seqs: int = 128
    tensor_parallel_size: int = 1
    images_per_prompt: int = 1  # ProGuard's prompts describe one image; more images → more requests
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 1280 * 28 * 28
    enable_prefix_caching: bool = True
    temperature: float = 0.0
    max_tokens: int = 1024
    top_logprobs: int = 5
    seed: int = 0


class VllmEngine:
    name = "proguard-vllm"

    def __init__(
        self,
        prompts: PromptSet,
        config: VllmConfig | None = None,
        llm_factory: Callable[..., Any] | None = None,
        sampling_params_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.config = config or VllmConfig()
        self.prompts = prompts
        self.taxonomy = prompts.taxonomy
        self.policy_version = prompts.policy_version
        self.model_version = f"{self.config.model}@{self.config.revision or 'local'}"
        if llm_factory is None or sampling_params_factory is None:
            import vllm  # the [gpu] extra

            llm_factory = llm_factory or vllm.LLM
            sampling_params_factory = sampling_params_factory or vllm.SamplingParams
            self.model_version += f";vllm=={vllm.__version__}"
        self.llm = llm_factory(**self.engine_kwargs())
        self.sampling_params = sampling_params_factory(**self.sampling_kwargs())

    def engine_kwargs(self) -> dict[str, Any]:
        c = self.config
        kw: dict[str, Any] = {
            "model": c.model,
            "dtype": c.dtype,
            "max_model_len": c.max_model_len,
            "gpu_memory_utilization": c.gpu_memory_utilization,
            "max_num_seqs": c.max_num_seqs,
            "tensor_parallel_size": c.tensor_parallel_size,
            "limit_mm_per_prompt": {"image": c.images_per_prompt},
            "mm_processor_kwargs": {"min_pixels": c.min_pixels, "max_pixels": c.max_pixels},
            "enable_prefix_caching": c.enable_prefix_caching,
            "seed": c.seed,
        }
        if c.revision:
            kw["revision"] = c.revision
        return kw

    def sampling_kwargs(self) -> dict[str, Any]:
        c = self.config
        return {
            "temperature": c.temperature,
            "max_tokens": c.max_tokens,
            "logprobs": c.top_logprobs,
            "seed": c.seed,
        }

    def build_request(self, item: ModerationItem) -> dict[str, Any]:
        images = list(item.images)
        r = render(self.prompts, item)
        req: dict[str, Any] = {"prompt": render_qwen2_5_vl(r.system, user_text(r), len(images))}
        if images:
            req["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
        return req

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        expanded = expand(batch, self.config.images_per_prompt)
        requests = [self.build_request(it) for _, it in expanded]
        try:
            outputs = self.llm.generate(requests, sampling_params=self.sampling_params, use_tqdm=False)
        except Exception as exc:  # CUDA OOM, engine dead...: the worker retries and bisects
            raise EngineError(f"vLLM generate failed: {type(exc).__name__}: {exc}") from exc
        if len(outputs) != len(requests):
            raise EngineError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        parts: list[list[Verdict]] = [[] for _ in batch]
        for (i, it), out in zip(expanded, outputs, strict=True):
            parts[i].append(self._verdict(it, out))
        return [combine(p) for p in parts]

    def _verdict(self, item: ModerationItem, out: Any) -> Verdict:
        completion = out.outputs[0]
        v = parse_output(completion.text, self.taxonomy, image_only=item.modality is Modality.IMAGE)
        tokens, tops = _vllm_logprobs(completion)
        v.p_unsafe = p_unsafe_from_logprobs(tokens, tops)
        return v

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, **asdict(self.config)}

    def close(self) -> None:
        self.llm = None


def _vllm_logprobs(completion: Any) -> tuple[list[str], list[dict[str, float]]]:
    """vLLM's ``CompletionOutput.logprobs`` (list of {token_id: Logprob}) → (tokens, top-k by text)."""
    lps = getattr(completion, "logprobs", None)
    ids = list(getattr(completion, "token_ids", []) or [])
    if not lps or len(lps) != len(ids):
        return [], []
    tokens: list[str] = []
    tops: list[dict[str, float]] = []
    for tid, pos in zip(ids, lps, strict=True):
        chosen = pos.get(tid)
        tokens.append((chosen.decoded_token or "") if chosen is not None else "")
        tops.append({(lp.decoded_token or ""): float(lp.logprob) for lp in pos.values()})
    return tokens, tops
