"""Validated settings from the environment (``GUARDSTREAM_*``) and CLI flags, with local defaults."""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from guard.config import CONFIGS, EngineConfig, EngineKind

_ALL = tuple(EngineKind)
_CPU, _VLLM, _SERVER, _HF = EngineKind.CPU, EngineKind.VLLM, EngineKind.VLLM_SERVER, EngineKind.TRANSFORMERS


@dataclass(frozen=True)
class EngineVariable:
    """``GUARDSTREAM_<NAME>`` sets ``field`` of the config of each engine in ``kinds``; its type, default
    and bounds are that config field's own (``guard.config``; the first kind's, the same in all)."""

    field: str
    kinds: tuple[EngineKind, ...]


# The one map from engine variables to engine config fields. Each is also a Settings field (generated from
# the config field: same type, default and bounds), so the environment, the settings file, CLI flags and
# --help see it like any other setting.
ENGINE_VARIABLES: dict[str, EngineVariable] = {
    "taxonomy_path": EngineVariable("taxonomy_path", _ALL),
    # engine requests outstanding at once; None: the engine's own (vllm: 2 x max_num_seqs)
    "max_in_flight": EngineVariable("max_in_flight", _ALL),
    "cpu_threshold": EngineVariable("threshold", (_CPU,)),
    "vllm_model": EngineVariable("model", (_VLLM, _HF)),  # local checkpoint directory or model id
    "vllm_model_revision": EngineVariable("revision", (_VLLM,)),
    "vllm_max_model_len": EngineVariable("max_model_len", (_VLLM,)),
    "vllm_gpu_memory_utilization": EngineVariable("gpu_memory_utilization", (_VLLM,)),
    # also the vllm-server's: its concurrency defaults to 2 x this
    "vllm_max_num_seqs": EngineVariable("max_num_seqs", (_VLLM,)),
    "vllm_tensor_parallel_size": EngineVariable("tensor_parallel_size", (_VLLM,)),
    # also the media fetcher's decode target and the image budget's unit, whatever the engine
    "vllm_max_pixels": EngineVariable("max_pixels", (_VLLM, _HF)),
    "vllm_max_tokens": EngineVariable("max_tokens", (_VLLM, _SERVER, _HF)),
    "vllm_server_url": EngineVariable("base_url", (_SERVER,)),
    "vllm_server_model": EngineVariable("model", (_SERVER,)),
    "vllm_server_api_key": EngineVariable("api_key", (_SERVER,)),
    "vllm_server_timeout_s": EngineVariable("timeout_s", (_SERVER,)),
    "vllm_server_dead_after_s": EngineVariable("dead_after_s", (_SERVER,)),
}


class DeliveryMode(StrEnum):
    AT_LEAST_ONCE = "at-least-once"  # idempotent producer; offsets committed after every ack
    EXACTLY_ONCE = "exactly-once"  # transactions: outputs and consumed offsets commit atomically


class ParseErrorPolicy(StrEnum):
    DLQ = "dlq"  # dead-letter the post with the raw output
    RETRY = "retry"  # moderate it once more on its own, then dead-letter


class KafkaSettings(BaseModel):
    """The broker, the worker's consumer group and topics, delivery; every client config is built from it
    (``workers.kafka.config``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "guardstream-moderation"
    posts_topic: str = "posts"
    verdicts_topic: str = "verdicts"
    novel_risk_topic: str = "novel-risks"
    dlq_topic: str = "posts-dlq"
    reviews_topic: str = "reviews"
    alerts_topic: str = "alerts"
    session_timeout_ms: int = Field(10_000, ge=1_000)
    delivery: DeliveryMode = DeliveryMode.AT_LEAST_ONCE
    transactional_id: str | None = None  # default: "<group_id>-<hostname>"; must be stable per instance
    # an open transaction of a dead worker is aborted after this long
    transaction_timeout_ms: int = Field(60_000, ge=1_000)
    produce_timeout_s: float = Field(30.0, gt=0)  # broker acks for one batch; then exit, nothing committed
    broker_deadline_s: float = Field(120.0, gt=0)  # broker unreachable this long: exit non-zero (code 3)
    # KAFKA_EXTRA: librdkafka properties added to every client's config (TLS, SASL, client ids...)
    extra: dict[str, str] = Field(default_factory=dict)


class MediaSettings(BaseModel):
    """S3 image fetching and decoding, and the image memory bounds (issue 13)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    s3_endpoint_url: str | None = "http://127.0.0.1:9000"
    s3_region: str = "us-east-1"
    # NoDecode: the env value reaches Settings._split_csv as text, so both `a,b` and JSON `["a","b"]` parse
    allowed_buckets: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["guardstream-media"])
    max_image_bytes: int = Field(10 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    fetch_concurrency: int = Field(16, ge=1, le=256)
    s3_max_attempts: int = Field(4, ge=1, le=10)
    deadline_s: float = Field(300.0, gt=0)  # MEDIA_DEADLINE_S: S3 unavailable this long: exit code 3
    # Media decode memory (issue 13): decoded pixel bytes all in-flight image decodes hold together
    decode_budget_bytes: int = Field(512 * 1024 * 1024, ge=16 * 1024 * 1024)
    # Normalised image bytes held by posts from decode until their outcome (issue 13 item 2); posts that
    # do not fit wait before the window (backpressure). 384 MiB = 100 images at VLLM_MAX_PIXELS (3.8 MiB
    # each): a 256-post window at a 30% one-image mix (~77 images) is never held back. The 2 GiB pod
    # (infra/k8s) then holds at most this + DECODE_BUDGET_BYTES (512 MiB) + the worker itself (~0.1 GiB,
    # make bench section 6) + the vllm-server engine's PNG/base64 request copies of the same admitted
    # images (~1.5x this): ~1.6 GiB, 0.4 GiB of margin.
    inflight_image_bytes: int = Field(384 * 1024 * 1024, ge=16 * 1024 * 1024)


class AlertSettings(BaseModel):
    """The emerging-risk alerts app (faust): its id and the alert rule (``ClusterConfig.from_settings``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    app_id: str = "guardstream-alerts"
    window_s: int = Field(3600, ge=1)
    min_count: int = Field(20, ge=1)
    min_authors: int = Field(5, ge=1)
    min_growth: float = Field(3.0, ge=1.0)
    join_threshold: float = Field(0.45, gt=0.0, le=1.0)
    merge_threshold: float = Field(0.8, gt=0.0, le=1.0)


class CacheSettings(BaseModel):
    """The Redis verdict cache."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "redis://127.0.0.1:6379/0"
    ttl_s: int = Field(7 * 24 * 3600, gt=0)
    enabled: bool = True


# Settings groups declared as models, like the engine configs: flat variable -> (group, its field). Each
# is a generated Settings field too (the group field's type, default and bounds), so GUARDSTREAM_<NAME>,
# the settings file, CLI flags and --help see the flat name; typed code reads the group.
GROUPS: dict[str, type[BaseModel]] = {
    "kafka": KafkaSettings,
    "media": MediaSettings,
    "alerts": AlertSettings,
    "cache": CacheSettings,
}
GROUP_VARIABLES: dict[str, tuple[str, str]] = {
    # Kafka
    "bootstrap_servers": ("kafka", "bootstrap_servers"),
    "group_id": ("kafka", "group_id"),
    "posts_topic": ("kafka", "posts_topic"),
    "verdicts_topic": ("kafka", "verdicts_topic"),
    "novel_risk_topic": ("kafka", "novel_risk_topic"),
    "dlq_topic": ("kafka", "dlq_topic"),
    "reviews_topic": ("kafka", "reviews_topic"),
    "alerts_topic": ("kafka", "alerts_topic"),
    "session_timeout_ms": ("kafka", "session_timeout_ms"),
    "delivery": ("kafka", "delivery"),
    "transactional_id": ("kafka", "transactional_id"),
    "transaction_timeout_ms": ("kafka", "transaction_timeout_ms"),
    "produce_timeout_s": ("kafka", "produce_timeout_s"),
    "broker_deadline_s": ("kafka", "broker_deadline_s"),
    "kafka_extra": ("kafka", "extra"),
    # S3 and images
    "s3_endpoint_url": ("media", "s3_endpoint_url"),
    "s3_region": ("media", "s3_region"),
    "allowed_buckets": ("media", "allowed_buckets"),
    "max_image_bytes": ("media", "max_image_bytes"),
    "max_image_pixels": ("media", "max_image_pixels"),
    "fetch_concurrency": ("media", "fetch_concurrency"),
    "s3_max_attempts": ("media", "s3_max_attempts"),
    "media_deadline_s": ("media", "deadline_s"),
    "decode_budget_bytes": ("media", "decode_budget_bytes"),
    "inflight_image_bytes": ("media", "inflight_image_bytes"),
    # Emerging-risk alerts (faust app)
    "alerts_app_id": ("alerts", "app_id"),
    "alert_window_s": ("alerts", "window_s"),
    "alert_min_count": ("alerts", "min_count"),
    "alert_min_authors": ("alerts", "min_authors"),
    "alert_min_growth": ("alerts", "min_growth"),
    "alert_join_threshold": ("alerts", "join_threshold"),
    "alert_merge_threshold": ("alerts", "merge_threshold"),
    # Redis verdict cache
    "redis_url": ("cache", "url"),
    "cache_ttl_s": ("cache", "ttl_s"),
    "cache_enabled": ("cache", "enabled"),
}

# Requests in flight to the vllm-server: its config's max_concurrency. Unset: 2 x VLLM_MAX_NUM_SEQS, which
# keeps the server's running batch full, so the variable is optional where the config field is not.
SERVER_CONCURRENCY = "vllm_server_concurrency"


def _variable_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, (group, field) in GROUP_VARIABLES.items():
        spec = GROUPS[group].model_fields[field]
        fields[name] = (spec.annotation, copy.copy(spec))
    for name, var in ENGINE_VARIABLES.items():
        spec = CONFIGS[var.kinds[0]].model_fields[var.field]
        for kind in var.kinds[1:]:  # one variable, one meaning: the configs must agree on it
            other = CONFIGS[kind].model_fields[var.field]
            if (other.annotation, other.default) != (spec.annotation, spec.default):
                raise TypeError(f"{name}: {kind} declares {var.field} unlike {var.kinds[0]}")
        fields[name] = (spec.annotation, copy.copy(spec))
    fields[SERVER_CONCURRENCY] = (int | None, Field(None, ge=1, le=4096))
    return fields


if TYPE_CHECKING:  # code reads these typed from Settings.engine_config / the groups, not as flat fields

    class _Variables(BaseSettings):
        pass

else:
    _Variables = create_model("_Variables", __base__=BaseSettings, **_variable_fields())


ENV_PREFIX = "GUARDSTREAM_"  # every setting's variable: GUARDSTREAM_<NAME>
# List settings whose variable is "a,b" (or a JSON list): ``Settings._split_csv``
CSV_SETTINGS = ("allowed_buckets",)
# Optional settings whose variable reads an empty value as unset: ``Settings._empty_is_none``
EMPTY_IS_NONE = (
    "s3_endpoint_url",
    "transactional_id",
    "taxonomy_path",
    "vllm_model_revision",
    "vllm_server_api_key",
    "metrics_port",
)


def variable(s: Settings, name: str) -> Any:
    """The value of the generated variable ``name`` (typed code reads ``engine_config`` or the group)."""
    return getattr(s, name)


def group_of(s: Settings, group: str) -> Any:
    """The settings group ``group`` from its variables (each mapped once, in GROUP_VARIABLES)."""
    values = {field: variable(s, name) for name, (g, field) in GROUP_VARIABLES.items() if g == group}
    return GROUPS[group].model_validate(values)


def engine_config_of(s: Settings) -> EngineConfig:
    """The selected engine's config from its variables (each mapped once, in ENGINE_VARIABLES)."""
    kind = EngineKind(s.engine)
    values = {var.field: variable(s, name) for name, var in ENGINE_VARIABLES.items() if kind in var.kinds}
    if kind is EngineKind.VLLM_SERVER:
        values["max_concurrency"] = variable(s, SERVER_CONCURRENCY) or 2 * variable(s, "vllm_max_num_seqs")
    try:
        return CONFIGS[kind].model_validate(values)
    except ValidationError as exc:  # a derived value out of bounds: name the variables behind the field
        names = {v.field: f"GUARDSTREAM_{n.upper()}" for n, v in ENGINE_VARIABLES.items() if kind in v.kinds}
        names["max_concurrency"] = (
            "GUARDSTREAM_VLLM_SERVER_CONCURRENCY (unset: 2 x GUARDSTREAM_VLLM_MAX_NUM_SEQS)"
        )
        raise ValueError(
            "; ".join(f"{names.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors())
        ) from None


class Settings(_Variables):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")
    _engine_config: EngineConfig | None = PrivateAttr(None)
    _kafka: KafkaSettings | None = PrivateAttr(None)
    _media: MediaSettings | None = PrivateAttr(None)
    _alerts: AlertSettings | None = PrivateAttr(None)
    _cache: CacheSettings | None = PrivateAttr(None)

    # Kafka, S3 and images, the alerts app and the Redis verdict cache are groups (GROUP_VARIABLES: their
    # flat fields are generated into _Variables), read as ``kafka``, ``media``, ``alerts`` and ``cache``

    # Batching
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_wait_ms: int = Field(50, ge=0, le=60_000)
    pause_after_s: float = Field(1.0, gt=0)  # window full this long: pause partitions (backpressure)

    # Streaming window and offsets
    commit_interval_ms: int = Field(1000, ge=10, le=600_000)  # watermark commits (and EOS transactions)
    revoke_timeout_s: float = Field(10.0, ge=0)  # on revoke, wait this long for in-flight work to finish
    shutdown_timeout_s: float = Field(30.0, ge=0)  # on SIGTERM, wait this long for in-flight work
    engine_timeout_s: float = Field(300.0, gt=0)  # one request; then retried alone once, then engine_timeout
    engine_deadline_s: float = Field(300.0, gt=0)  # engine dead this long: exit code 3
    outage_backoff_s: float = Field(
        2.0, gt=0
    )  # first retry of a dead engine / unavailable S3 (doubles to 30s)
    dlq_max_original_bytes: int = Field(
        64 * 1024, ge=0, le=512 * 1024
    )  # original value kept in a dead letter

    # Engine: the kind here; every engine variable (GUARDSTREAM_VLLM_*, CPU_THRESHOLD, TAXONOMY_PATH,
    # MAX_IN_FLIGHT) is a field of _Variables, built into ``engine_config`` below
    engine: EngineKind = EngineKind.CPU
    on_parse_error: ParseErrorPolicy = ParseErrorPolicy.DLQ
    engine_retries: int = Field(1, ge=0, le=5)
    publish_reasoning: bool = False

    # Operations
    log_format: str = Field("auto", pattern="^(auto|json|console)$")
    log_level: str = "INFO"
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"  # bind address of /metrics, /healthz, /readyz
    lag_interval_s: float = Field(10.0, gt=0)

    @property
    def engine_config(self) -> EngineConfig:
        """The selected engine's config, built once from its variables when the settings load."""
        if self._engine_config is None:  # model_construct(): no validator ran
            self._engine_config = engine_config_of(self)
        return self._engine_config

    @property
    def kafka(self) -> KafkaSettings:
        """The Kafka clients' settings, built once when the settings load."""
        if self._kafka is None:  # model_construct(): no validator ran
            self._kafka = group_of(self, "kafka")
        return self._kafka

    @property
    def media(self) -> MediaSettings:
        """The media fetcher's and image budgets' settings, built once when the settings load."""
        if self._media is None:  # model_construct(): no validator ran
            self._media = group_of(self, "media")
        return self._media

    @property
    def alerts(self) -> AlertSettings:
        """The alerts app's settings, built once when the settings load."""
        if self._alerts is None:  # model_construct(): no validator ran
            self._alerts = group_of(self, "alerts")
        return self._alerts

    @property
    def cache(self) -> CacheSettings:
        """The verdict cache's settings, built once when the settings load."""
        if self._cache is None:  # model_construct(): no validator ran
            self._cache = group_of(self, "cache")
        return self._cache

    @property
    def target_pixels(self) -> int:
        """VLLM_MAX_PIXELS, whatever the engine: the media fetcher decodes no more than the engine uses."""
        return int(variable(self, "vllm_max_pixels"))

    def _groups_from_variables(self) -> Self:
        self._engine_config = engine_config_of(self)
        self._kafka = group_of(self, "kafka")
        self._media = group_of(self, "media")
        self._alerts = group_of(self, "alerts")
        self._cache = group_of(self, "cache")
        return self

    @model_validator(mode="after")
    def _build_groups(self) -> Self:
        return self._groups_from_variables()

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """As pydantic's, and the engine config and groups follow an updated setting (no validator runs)."""
        copied = super().model_copy(update=update, deep=deep)
        return copied._groups_from_variables() if update else copied

    @field_validator(*CSV_SETTINGS, mode="before")
    @classmethod
    def _split_csv(cls, v: object) -> object:
        if isinstance(v, str) and not v.strip().startswith("["):
            return [b.strip() for b in v.split(",") if b.strip()]
        if isinstance(v, str):  # JSON list (NoDecode hands the env value over as text)
            return json.loads(v)
        return v

    # Deployment manifests write "unset" as an empty string (the k8s ConfigMap's S3_ENDPOINT_URL: "" means
    # AWS S3 itself); for optional settings that is None, not an empty URL/path/number that fails later.
    @field_validator(*EMPTY_IS_NONE, mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v


def settings_environ(s: Settings, *, only: Iterable[str] | None = None) -> dict[str, str]:
    """``GUARDSTREAM_<NAME>`` -> value text for each setting of ``s`` (of its class: ``ConsoleSettings``
    has more) that is not its default, or for each setting named in ``only``, written so that the class
    read from that environment holds the same values: how a parent process hands its settings to a child
    (``guardstream demo``'s alerts app, a supervisor, a test's subprocess). A setting left out is read as
    its default, so the child's environment must hold no other ``GUARDSTREAM_*`` (``child_environ``).

    Text: bools ``true``/``false``, enums by value, dicts (``KAFKA_EXTRA``) as JSON, ``ALLOWED_BUCKETS`` as
    ``a,b`` (JSON where a name would not survive the split), unset as ``""`` where that reads as unset
    (``EMPTY_IS_NONE``). An unset value of another optional setting is left out, as ``""`` would not
    parse: each of those is unset by default (a unit test holds them to it)."""
    fields = type(s).model_fields
    names = list(fields) if only is None else list(only)
    if unknown := [n for n in names if n not in fields]:
        raise ValueError(f"not settings of {type(s).__name__}: {', '.join(unknown)}")
    out: dict[str, str] = {}
    for name in names:
        value = getattr(s, name)
        if only is None and value == fields[name].get_default(call_default_factory=True):
            continue
        if value is None and name not in EMPTY_IS_NONE:
            continue
        out[f"{ENV_PREFIX}{name.upper()}"] = _environ_text(name, value)
    return out


def child_environ(s: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process that is to run with ``s``: ``environ`` (default: this
    process's) without any ``GUARDSTREAM_*`` variable, plus ``settings_environ(s)``."""
    env = os.environ if environ is None else environ
    return {**{k: v for k, v in env.items() if not k.startswith(ENV_PREFIX)}, **settings_environ(s)}


def _environ_text(name: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, list) and name in CSV_SETTINGS:
        csv = ",".join(str(v) for v in value)
        try:
            if Settings._split_csv(csv) == value:
                return csv
        except ValueError:  # "[a" read as JSON
            pass
        return json.dumps(value)
    if isinstance(value, dict | list):  # pydantic-settings decodes a complex setting's variable as JSON
        return json.dumps(value)
    return str(value)


def describe_settings_error(exc: SettingsError, environ: Mapping[str, str] | None = None) -> str:
    """One line for a variable the environment source could not even parse (pydantic-settings decodes a
    dict-valued variable, ``GUARDSTREAM_KAFKA_EXTRA``, as JSON before validating it): the variable, its
    value and what is expected, instead of a traceback."""
    env = os.environ if environ is None else environ
    m = re.search(r'field "(\w+)"', str(exc))
    if m is None:
        return str(exc)
    var = f"GUARDSTREAM_{m.group(1).upper()}"
    return (
        f"{var}={env.get(var, '')!r}: not valid JSON; write it as a JSON object, "
        f'e.g. {var}=\'{{"security.protocol": "SASL_SSL"}}\''
    )


def describe_invalid(e: Mapping[str, Any]) -> str:
    """One pydantic validation error of the settings as ``GUARDSTREAM_X='value': why``; an entry of a
    dict- or list-valued setting as ``GUARDSTREAM_X['key']=value``. A check across settings (no location)
    is its own message: it names the variables."""
    loc = e.get("loc") or ()
    if not loc:
        return str(e["msg"])
    where = "".join(f"[{k!r}]" for k in loc[1:])
    return f"{ENV_PREFIX}{str(loc[0]).upper()}{where}={e.get('input')!r}: {e['msg']}"
