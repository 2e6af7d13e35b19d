"""The engine config union (``guard.config``) built once from the ``GUARDSTREAM_*`` engine variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from guard.config import (
    CONFIGS,
    CpuConfig,
    EngineConfig,
    EngineKind,
    ServerConfig,
    TransformersConfig,
    VllmConfig,
)
from workers.cli.base import _default_text, describe_validation, unknown_variables
from workers.preflight import load_settings
from workers.settings import ENGINE_VARIABLES, GROUP_VARIABLES, SERVER_CONCURRENCY, CacheSettings, Settings

CPU, VLLM, SERVER, HF = EngineKind.CPU, EngineKind.VLLM, EngineKind.VLLM_SERVER, EngineKind.TRANSFORMERS


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("GUARDSTREAM_")]:
        monkeypatch.delenv(key)


# variable, value as the environment has it, the engine, the field of its config, the value it holds
CASES: list[tuple[str, str, EngineKind, str, Any]] = [
    ("TAXONOMY_PATH", "/etc/taxonomy.yaml", CPU, "taxonomy_path", Path("/etc/taxonomy.yaml")),
    ("TAXONOMY_PATH", "/etc/taxonomy.yaml", SERVER, "taxonomy_path", Path("/etc/taxonomy.yaml")),
    ("MAX_IN_FLIGHT", "77", VLLM, "max_in_flight", 77),
    ("MAX_IN_FLIGHT", "77", HF, "max_in_flight", 77),
    ("CPU_THRESHOLD", "0.7", CPU, "threshold", 0.7),
    ("VLLM_MODEL", "/models/pg", VLLM, "model", "/models/pg"),
    ("VLLM_MODEL", "/models/pg", HF, "model", "/models/pg"),
    ("VLLM_MODEL_REVISION", "abc123", VLLM, "revision", "abc123"),
    ("VLLM_MAX_MODEL_LEN", "4096", VLLM, "max_model_len", 4096),
    ("VLLM_GPU_MEMORY_UTILIZATION", "0.5", VLLM, "gpu_memory_utilization", 0.5),
    ("VLLM_MAX_NUM_SEQS", "64", VLLM, "max_num_seqs", 64),
    ("VLLM_TENSOR_PARALLEL_SIZE", "2", VLLM, "tensor_parallel_size", 2),
    ("VLLM_MAX_PIXELS", "200704", VLLM, "max_pixels", 200704),
    ("VLLM_MAX_PIXELS", "200704", HF, "max_pixels", 200704),
    ("VLLM_MAX_TOKENS", "256", VLLM, "max_tokens", 256),
    ("VLLM_MAX_TOKENS", "256", SERVER, "max_tokens", 256),
    ("VLLM_MAX_TOKENS", "256", HF, "max_tokens", 256),
    ("VLLM_SERVER_URL", "http://gpu:8000/v1", SERVER, "base_url", "http://gpu:8000/v1"),
    ("VLLM_SERVER_MODEL", "pg7", SERVER, "model", "pg7"),
    ("VLLM_SERVER_API_KEY", "sekrit", SERVER, "api_key", "sekrit"),
    ("VLLM_SERVER_TIMEOUT_S", "30", SERVER, "timeout_s", 30.0),
    ("VLLM_SERVER_DEAD_AFTER_S", "40", SERVER, "dead_after_s", 40.0),
    ("VLLM_SERVER_CONCURRENCY", "12", SERVER, "max_concurrency", 12),
]


@pytest.mark.parametrize(("var", "value", "kind", "field", "expected"), CASES)
def test_each_engine_variable_sets_its_config_field(
    var: str, value: str, kind: EngineKind, field: str, expected: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARDSTREAM_ENGINE", kind.value)
    monkeypatch.setenv(f"GUARDSTREAM_{var}", value)
    config = Settings().engine_config
    assert type(config) is CONFIGS[kind] and config.kind is kind
    assert getattr(config, field) == expected
    # every other field keeps the config's own default
    assert config.model_dump(exclude={field}) == CONFIGS[kind]().model_dump(exclude={field})


def test_every_engine_variable_is_tested() -> None:
    tested = {(var.lower(), kind) for var, _, kind, _, _ in CASES}
    assert {var for var, _ in tested} == {*ENGINE_VARIABLES, SERVER_CONCURRENCY}
    for name, v in ENGINE_VARIABLES.items():
        if set(v.kinds) != set(EngineKind):  # one shared by every engine: two of them suffice
            assert {(name, kind) for kind in v.kinds} <= tested, name


@pytest.mark.parametrize("kind", list(EngineKind))
def test_defaults_are_the_engine_configs_own(kind: EngineKind) -> None:
    config = Settings(engine=kind).engine_config
    assert config == CONFIGS[kind]()
    # one config object per settings object: built when the settings loaded, not per read
    s = Settings(engine=kind)
    assert s.engine_config is s.engine_config


def test_derived_defaults_hold() -> None:
    # the server's concurrency: 2 x VLLM_MAX_NUM_SEQS unless VLLM_SERVER_CONCURRENCY is set
    assert isinstance(c := Settings(engine="vllm-server").engine_config, ServerConfig)
    assert c.max_concurrency == 256 and c.max_in_flight is None
    assert isinstance(c := Settings(engine="vllm-server", vllm_max_num_seqs=64).engine_config, ServerConfig)
    assert c.max_concurrency == 128
    s = Settings(engine="vllm-server", vllm_max_num_seqs=64, vllm_server_concurrency=10)
    assert isinstance(s.engine_config, ServerConfig) and s.engine_config.max_concurrency == 10
    # max_in_flight unset: None, each engine's own default applies (vllm: 2 x max_num_seqs)
    for kind in EngineKind:
        assert Settings(engine=kind).engine_config.max_in_flight is None
    # the media fetcher's target is VLLM_MAX_PIXELS whatever the engine
    assert Settings().target_pixels == 1280 * 28 * 28
    assert Settings(vllm_max_pixels=200704).target_pixels == 200704


def test_model_copy_rebuilds_the_engine_config() -> None:
    s = Settings()
    t = s.model_copy(update={"cpu_threshold": 0.9})
    assert isinstance(t.engine_config, CpuConfig) and t.engine_config.threshold == 0.9
    # unset: the shipped head's own operating point (guard.engines.cpu.engine reads it from the head)
    assert isinstance(s.engine_config, CpuConfig) and s.engine_config.threshold is None
    v = s.model_copy(update={"engine": "vllm", "vllm_model": "/m"})
    assert isinstance(v.engine_config, VllmConfig) and v.engine_config.model == "/m"
    assert isinstance(Settings.model_construct().engine_config, CpuConfig)  # no validator ran


def test_empty_optional_variables_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDSTREAM_ENGINE", "vllm-server")
    monkeypatch.setenv("GUARDSTREAM_VLLM_SERVER_API_KEY", "")
    monkeypatch.setenv("GUARDSTREAM_TAXONOMY_PATH", " ")
    c = Settings().engine_config
    assert isinstance(c, ServerConfig) and c.api_key is None and c.taxonomy_path is None


def test_an_unknown_engine_fails_at_load_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDSTREAM_ENGINE", "gpu")
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert "--engine / GUARDSTREAM_ENGINE='gpu'" in describe_validation(exc.value)
    s, result = load_settings()
    assert s is None and not result.ok and result.detail.startswith("GUARDSTREAM_ENGINE='gpu': ")


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("VLLM_SERVER_DEAD_AFTER_S", "-1"),
        ("VLLM_MAX_NUM_SEQS", "0"),
        ("VLLM_SERVER_CONCURRENCY", "0"),
        ("CPU_THRESHOLD", "1.5"),
        ("VLLM_MAX_TOKENS", "many"),
        ("MAX_IN_FLIGHT", "0"),
    ],
)
def test_an_invalid_engine_value_fails_at_load_naming_the_variable(
    var: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUARDSTREAM_ENGINE", "vllm-server")
    monkeypatch.setenv(f"GUARDSTREAM_{var}", value)
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert f"GUARDSTREAM_{var}={value!r}" in describe_validation(exc.value)
    _, result = load_settings()
    assert not result.ok and result.detail.startswith(f"GUARDSTREAM_{var}={value!r}: ")


def test_a_derived_value_out_of_bounds_names_the_variables() -> None:
    s = Settings(engine="vllm-server")
    with pytest.raises(ValueError, match="GUARDSTREAM_VLLM_SERVER_CONCURRENCY"):
        s.model_copy(update={"vllm_max_num_seqs": 0})  # model_copy validates no field; the config does


def test_engine_variables_are_settings_with_the_configs_defaults() -> None:
    # --help shows each option's variable and default from Settings; the defaults are the configs'
    assert _default_text("vllm_max_num_seqs") == "128"
    assert _default_text("vllm_server_concurrency") == "unset"
    assert _default_text("vllm_server_dead_after_s") == "15.0"
    assert _default_text("cpu_threshold") == "unset"  # the head's operating point (0.5 for the shipped head)
    assert _default_text("engine") == "cpu"
    assert unknown_variables({"GUARDSTREAM_VLLM_SERVER_DEAD_AFTER_S": "3"}) == []
    assert (
        Settings.model_fields["vllm_max_model_len"].metadata
        == VllmConfig.model_fields["max_model_len"].metadata
    )


def test_the_union_is_discriminated_by_kind() -> None:
    adapter: TypeAdapter[EngineConfig] = TypeAdapter(EngineConfig)
    assert isinstance(
        adapter.validate_python({"kind": "vllm-server", "base_url": "http://x/v1"}), ServerConfig
    )
    assert isinstance(adapter.validate_python({"kind": "transformers"}), TransformersConfig)
    with pytest.raises(ValidationError, match="max_num_seqs"):
        adapter.validate_python({"kind": "cpu", "max_num_seqs": 3})  # a field of another engine
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "tpu"})


# ---- the cache group: the same mechanism for a settings group (flat variables, one typed model) -------
def test_cache_group_is_built_from_its_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().cache == CacheSettings()  # the defaults are the group's own
    monkeypatch.setenv("GUARDSTREAM_REDIS_URL", "redis://cache:6380/1")
    monkeypatch.setenv("GUARDSTREAM_CACHE_TTL_S", "60")
    monkeypatch.setenv("GUARDSTREAM_CACHE_ENABLED", "false")
    s = Settings()
    assert s.cache == CacheSettings(url="redis://cache:6380/1", ttl_s=60, enabled=False)
    assert set(GROUP_VARIABLES) <= set(Settings.model_fields)
    assert _default_text("cache_ttl_s") == str(7 * 24 * 3600)
    on = s.model_copy(update={"cache_enabled": True})
    assert on.cache.enabled is True and s.cache.enabled is False
    monkeypatch.setenv("GUARDSTREAM_CACHE_TTL_S", "0")
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert "GUARDSTREAM_CACHE_TTL_S='0'" in describe_validation(exc.value)
