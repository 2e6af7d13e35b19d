"""Engine configuration: one validated model per engine, selected by ``kind``.

Each engine setting is declared here once (type, default, bounds). ``workers.settings`` maps the
``GUARDSTREAM_*`` variables onto these fields and builds the selected engine's config once, when settings
load; ``guard.engines.build_engine``/``build_streaming_engine`` take that config as is. Code that builds
an engine directly (tests, ``gpu_proof``, the bench) constructs the model it needs.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

PROGUARD_MODEL = "yushaohan/ProGuard-7B"
MAX_PIXELS = 1280 * 28 * 28  # Qwen2.5-VL's default max_pixels: 1280 visual tokens of 28x28
MIN_PIXELS = 4 * 28 * 28


class EngineKind(StrEnum):
    CPU = "cpu"
    VLLM = "vllm"
    VLLM_SERVER = "vllm-server"
    TRANSFORMERS = "transformers"


class _Engine(BaseModel):
    """What every engine's config has."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # the taxonomy the prompts are built from; None: the packaged ProGuard taxonomy
    taxonomy_path: Path | None = None
    # posts the worker keeps outstanding in the engine; None: the engine's own default
    # (vllm: 2 x max_num_seqs; vllm-server: max_concurrency; cpu/transformers: 2 micro-batches)
    max_in_flight: int | None = Field(None, ge=1, le=65_536)

    def describe_fields(self) -> dict[str, object]:
        """The engine's own knobs (``describe()`` output): without the selector and the taxonomy path."""
        return self.model_dump(exclude={"kind", "taxonomy_path"})


class CpuConfig(_Engine):
    kind: Literal[EngineKind.CPU] = EngineKind.CPU
    # Calibrated p_unsafe at or above this is unsafe. None: the head's shipped operating point, chosen on
    # the calib split as the lowest threshold >= 0.5 whose benign false-positive rate is at most 10%
    # (training.cpu_head; 0.5 for the shipped head).
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    # Unsafe but no subcategory above this probability: a novel risk. None: the head's shipped value.
    novel_confidence: float | None = None


class VllmConfig(_Engine):
    kind: Literal[EngineKind.VLLM] = EngineKind.VLLM
    model: str = PROGUARD_MODEL  # a local path (no hub access needed) or a model id
    revision: str | None = None
    dtype: str = "bfloat16"
    max_model_len: int = Field(8192, ge=1024)
    gpu_memory_utilization: float = Field(0.90, gt=0.0, le=1.0)
    max_num_seqs: int = Field(128, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    images_per_prompt: int = 1  # ProGuard's prompts describe one image; more images → more requests
    min_pixels: int = MIN_PIXELS
    max_pixels: int = Field(MAX_PIXELS, ge=28 * 28)
    enable_prefix_caching: bool = True
    temperature: float = 0.0
    max_tokens: int = Field(1024, ge=16)
    top_logprobs: int = 5
    seed: int = 0


class ServerConfig(_Engine):
    kind: Literal[EngineKind.VLLM_SERVER] = EngineKind.VLLM_SERVER
    base_url: str = "http://127.0.0.1:8003/v1"
    model: str = "ProGuard-7B"
    api_key: str | None = None
    # requests in flight to the server: 2 x its max_num_seqs keeps its running batch full (the settings
    # derive it from VLLM_MAX_NUM_SEQS unless VLLM_SERVER_CONCURRENCY says otherwise)
    max_concurrency: int = Field(256, ge=1)
    timeout_s: float = Field(120.0, gt=0)  # one request, end to end
    connect_timeout_s: float = 5.0
    max_attempts: int = 3  # the batch ServerEngine only; the streaming engine retries by time (dead_after_s)
    backoff_base_s: float = 0.2
    backoff_max_s: float = 5.0
    # the server failing (unreachable, or no success at all) this long: engine dead; one request failing
    # this long while the server answers others: that request's error
    dead_after_s: float = Field(15.0, ge=0)
    temperature: float = 0.0
    max_tokens: int = Field(1024, ge=16)
    top_logprobs: int = 5
    seed: int = 0


class TransformersConfig(_Engine):
    kind: Literal[EngineKind.TRANSFORMERS] = EngineKind.TRANSFORMERS
    model: str = PROGUARD_MODEL
    device_map: str = "auto"
    dtype: str = "bfloat16"
    min_pixels: int = MIN_PIXELS
    max_pixels: int = Field(MAX_PIXELS, ge=28 * 28)
    max_tokens: int = Field(1024, ge=16)
    top_logprobs: int = 5
    temperature: float = 0.0  # 0: greedy, as ProGuard's inference.py
    seed: int = 0


EngineConfig = Annotated[
    CpuConfig | VllmConfig | ServerConfig | TransformersConfig, Field(discriminator="kind")
]

CONFIGS: dict[EngineKind, type[CpuConfig | VllmConfig | ServerConfig | TransformersConfig]] = {
    EngineKind.CPU: CpuConfig,
    EngineKind.VLLM: VllmConfig,
    EngineKind.VLLM_SERVER: ServerConfig,
    EngineKind.TRANSFORMERS: TransformersConfig,
}
