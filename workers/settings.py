"""Validated settings from the environment (``GUARDSTREAM_*``) and CLI flags, with local defaults."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from guard.engines import EngineKind, EngineOptions


class DeliveryMode(StrEnum):
    AT_LEAST_ONCE = "at-least-once"  # idempotent producer; offsets committed after every ack
    EXACTLY_ONCE = "exactly-once"  # transactions: outputs and consumed offsets commit atomically


class ParseErrorPolicy(StrEnum):
    DLQ = "dlq"  # dead-letter the post with the raw output
    RETRY = "retry"  # moderate it once more on its own, then dead-letter


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GUARDSTREAM_", extra="ignore")

    # Kafka
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "guardstream-moderation"
    posts_topic: str = "posts"
    verdicts_topic: str = "verdicts"
    novel_risk_topic: str = "novel-risks"
    dlq_topic: str = "posts-dlq"
    reviews_topic: str = "reviews"
    alerts_topic: str = "alerts"

    # Emerging-risk alerts (faust app)
    alerts_app_id: str = "guardstream-alerts"
    alert_window_s: int = Field(3600, ge=1)
    alert_min_count: int = Field(20, ge=1)
    alert_min_authors: int = Field(5, ge=1)
    alert_min_growth: float = Field(3.0, ge=1.0)
    alert_join_threshold: float = Field(0.45, gt=0.0, le=1.0)
    alert_merge_threshold: float = Field(0.8, gt=0.0, le=1.0)
    session_timeout_ms: int = Field(10_000, ge=1_000)
    delivery: DeliveryMode = DeliveryMode.AT_LEAST_ONCE
    transactional_id: str | None = None  # default: "<group_id>-<hostname>"; must be stable per instance
    transaction_timeout_ms: int = Field(
        60_000, ge=1_000
    )  # an open transaction of a dead worker is aborted after
    produce_timeout_s: float = Field(30.0, gt=0)  # broker acks for one batch; then exit, nothing committed
    broker_deadline_s: float = Field(120.0, gt=0)  # broker unreachable this long: exit non-zero (code 3)
    kafka_extra: dict[str, str] = Field(default_factory=dict)

    # S3
    s3_endpoint_url: str | None = "http://127.0.0.1:9000"
    s3_region: str = "us-east-1"
    # NoDecode: the env value reaches _split_csv as text, so both `a,b` and JSON `["a","b"]` parse
    allowed_buckets: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["guardstream-media"])
    max_image_bytes: int = Field(10 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    fetch_concurrency: int = Field(16, ge=1, le=256)
    s3_max_attempts: int = Field(4, ge=1, le=10)

    # Redis verdict cache
    redis_url: str = "redis://127.0.0.1:6379/0"
    cache_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    cache_enabled: bool = True

    # Batching
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_wait_ms: int = Field(50, ge=0, le=60_000)
    pause_after_s: float = Field(1.0, gt=0)  # window full this long: pause partitions (backpressure)

    # Streaming window and offsets
    # engine requests outstanding at once; None: the engine's own ``max_in_flight`` (vLLM: 2x max_num_seqs)
    max_in_flight: int | None = Field(None, ge=1, le=65_536)
    commit_interval_ms: int = Field(1000, ge=10, le=600_000)  # watermark commits (and EOS transactions)
    revoke_timeout_s: float = Field(10.0, ge=0)  # on revoke, wait this long for in-flight work to finish
    shutdown_timeout_s: float = Field(30.0, ge=0)  # on SIGTERM, wait this long for in-flight work
    engine_timeout_s: float = Field(300.0, gt=0)  # one request; then retried alone once, then engine_timeout
    engine_deadline_s: float = Field(300.0, gt=0)  # engine dead this long: exit code 3
    media_deadline_s: float = Field(300.0, gt=0)  # S3 unavailable this long: exit code 3
    outage_backoff_s: float = Field(
        2.0, gt=0
    )  # first retry of a dead engine / unavailable S3 (doubles to 30s)
    dlq_max_original_bytes: int = Field(
        64 * 1024, ge=0, le=512 * 1024
    )  # original value kept in a dead letter

    # Engine
    engine: EngineKind = EngineKind.CPU
    taxonomy_path: Path | None = None
    on_parse_error: ParseErrorPolicy = ParseErrorPolicy.DLQ
    engine_retries: int = Field(1, ge=0, le=5)
    publish_reasoning: bool = False
    cpu_threshold: float = Field(0.5, ge=0.0, le=1.0)
    vllm_model: str = "yushaohan/ProGuard-7B"  # local checkpoint directory or model id
    vllm_model_revision: str | None = None
    vllm_max_model_len: int = Field(8192, ge=1024)
    vllm_gpu_memory_utilization: float = Field(0.90, gt=0.0, le=1.0)
    vllm_max_num_seqs: int = Field(128, ge=1)
    vllm_tensor_parallel_size: int = Field(1, ge=1)
    vllm_max_pixels: int = Field(1280 * 28 * 28, ge=28 * 28)
    vllm_max_tokens: int = Field(1024, ge=16)
    vllm_server_url: str = "http://127.0.0.1:8003/v1"
    vllm_server_model: str = "ProGuard-7B"
    vllm_server_api_key: str | None = None
    # requests in flight to the server; None: 2 x VLLM_MAX_NUM_SEQS (keeps the server's running batch full)
    vllm_server_concurrency: int | None = Field(None, ge=1, le=4096)
    vllm_server_timeout_s: float = Field(120.0, gt=0)

    # Operations
    log_format: str = Field("auto", pattern="^(auto|json|console)$")
    log_level: str = "INFO"
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"  # bind address of /metrics, /healthz, /readyz
    lag_interval_s: float = Field(10.0, gt=0)

    # Media decode memory (issue 13): decoded pixel bytes all in-flight image decodes hold together
    decode_budget_bytes: int = Field(512 * 1024 * 1024, ge=16 * 1024 * 1024)
    # Normalised image bytes held by posts from decode until their outcome (issue 13 item 2); posts that
    # do not fit wait before the window (backpressure). 384 MiB = 100 images at VLLM_MAX_PIXELS (3.8 MiB
    # each): a 256-post window at a 30% one-image mix (~77 images) is never held back. The 2 GiB pod
    # (infra/k8s) then holds at most this + DECODE_BUDGET_BYTES (512 MiB) + the worker itself (~0.1 GiB,
    # make bench section 6) + the vllm-server engine's PNG/base64 request copies of the same admitted
    # images (~1.5x this): ~1.6 GiB, 0.4 GiB of margin.
    inflight_image_bytes: int = Field(384 * 1024 * 1024, ge=16 * 1024 * 1024)

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            taxonomy_path=self.taxonomy_path,
            cpu_threshold=self.cpu_threshold,
            model=self.vllm_model,
            model_revision=self.vllm_model_revision,
            max_model_len=self.vllm_max_model_len,
            gpu_memory_utilization=self.vllm_gpu_memory_utilization,
            max_num_seqs=self.vllm_max_num_seqs,
            tensor_parallel_size=self.vllm_tensor_parallel_size,
            max_pixels=self.vllm_max_pixels,
            max_tokens=self.vllm_max_tokens,
            server_url=self.vllm_server_url,
            server_model=self.vllm_server_model,
            server_api_key=self.vllm_server_api_key,
            server_concurrency=self.vllm_server_concurrency,
            server_timeout_s=self.vllm_server_timeout_s,
        )

    @field_validator("allowed_buckets", mode="before")
    @classmethod
    def _split_csv(cls, v: object) -> object:
        if isinstance(v, str) and not v.strip().startswith("["):
            return [b.strip() for b in v.split(",") if b.strip()]
        if isinstance(v, str):  # JSON list (NoDecode hands the env value over as text)
            return json.loads(v)
        return v

    # Deployment manifests write "unset" as an empty string (the k8s ConfigMap's S3_ENDPOINT_URL: "" means
    # AWS S3 itself); for optional settings that is None, not an empty URL/path/number that fails later.
    @field_validator(
        "s3_endpoint_url",
        "transactional_id",
        "taxonomy_path",
        "vllm_model_revision",
        "vllm_server_api_key",
        "metrics_port",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v
