"""The settings groups (``kafka``, ``media``, ``alerts``, ``cache``): each ``GUARDSTREAM_*`` variable keeps
its flat name (environment, settings file, CLI flags, ``--help``) and is read typed from its group."""

from __future__ import annotations

import os
import re
import types
from enum import Enum
from pathlib import Path
from typing import Any

import annotated_types
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import NoDecode

from workers.alerts.clustering import ClusterConfig
from workers.cli.base import _default_text, describe_validation, env_name, read_config_file, unknown_variables
from workers.console.settings import ConsoleSettings
from workers.kafka.config import consumer_config, producer_config
from workers.settings import (
    EMPTY_IS_NONE,
    GROUP_VARIABLES,
    GROUPS,
    AlertSettings,
    CacheSettings,
    DeliveryMode,
    KafkaSettings,
    MediaSettings,
    Settings,
    child_environ,
    settings_environ,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("GUARDSTREAM_")]:
        monkeypatch.delenv(key)


def test_every_group_field_is_one_variable_and_a_setting() -> None:
    mapped = sorted(GROUP_VARIABLES.values())
    assert len(mapped) == len(set(mapped))  # no group field is set by two variables
    assert set(mapped) == {(g, f) for g, model in GROUPS.items() for f in model.model_fields}
    assert set(GROUP_VARIABLES) <= set(Settings.model_fields)
    for name, (group, field) in GROUP_VARIABLES.items():  # the flat field is the group field's own
        flat, own = Settings.model_fields[name], GROUPS[group].model_fields[field]
        assert (flat.annotation, flat.metadata) == (own.annotation, own.metadata), name
        assert flat.get_default(call_default_factory=True) == own.get_default(call_default_factory=True)


def test_the_defaults_are_the_groups_own() -> None:
    s = Settings()
    assert (s.kafka, s.media, s.alerts, s.cache) == (
        KafkaSettings(),
        MediaSettings(),
        AlertSettings(),
        CacheSettings(),
    )
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092" and s.kafka.delivery is DeliveryMode.AT_LEAST_ONCE
    assert s.media.allowed_buckets == ["guardstream-media"] and s.media.deadline_s == 300.0
    assert s.alerts.app_id == "guardstream-alerts" and s.alerts.join_threshold == 0.45
    assert _default_text("allowed_buckets") == "guardstream-media"  # what --help shows
    assert _default_text("session_timeout_ms") == "10000"


def test_groups_are_built_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in {
        "BOOTSTRAP_SERVERS": "kafka:9093",
        "POSTS_TOPIC": "in",
        "DELIVERY": "exactly-once",
        "KAFKA_EXTRA": '{"security.protocol": "SASL_SSL"}',
        "S3_REGION": "eu-west-1",
        "MEDIA_DEADLINE_S": "12.5",
        "INFLIGHT_IMAGE_BYTES": str(64 << 20),
        "ALERTS_APP_ID": "alerts-2",
        "ALERT_MIN_COUNT": "3",
        "ALERT_MERGE_THRESHOLD": "0.9",
    }.items():
        monkeypatch.setenv(f"GUARDSTREAM_{var}", value)
    s = Settings()
    assert (s.kafka.bootstrap_servers, s.kafka.posts_topic) == ("kafka:9093", "in")
    assert s.kafka.delivery is DeliveryMode.EXACTLY_ONCE
    assert s.kafka.extra == {"security.protocol": "SASL_SSL"}
    assert (s.media.s3_region, s.media.deadline_s, s.media.inflight_image_bytes) == (
        "eu-west-1",
        12.5,
        64 << 20,
    )
    assert (s.alerts.app_id, s.alerts.min_count, s.alerts.merge_threshold) == ("alerts-2", 3, 0.9)
    cfg = ClusterConfig.from_settings(s)  # the alerts app reads the group
    assert (cfg.min_count, cfg.merge_threshold, cfg.window_s) == (3, 0.9, 3600)


@pytest.mark.parametrize("value", ["a,b", " a , b ", '["a", "b"]', ' ["a","b"] '])
def test_allowed_buckets_from_the_environment_as_csv_or_json(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NoDecode survives the copy into the generated flat field: the env value reaches _split_csv as text
    assert NoDecode in Settings.model_fields["allowed_buckets"].metadata
    monkeypatch.setenv("GUARDSTREAM_ALLOWED_BUCKETS", value)
    assert Settings().media.allowed_buckets == ["a", "b"]


def test_an_empty_optional_value_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDSTREAM_S3_ENDPOINT_URL", "")  # the k8s ConfigMap's: AWS S3 itself
    monkeypatch.setenv("GUARDSTREAM_TRANSACTIONAL_ID", " ")
    s = Settings()
    assert s.media.s3_endpoint_url is None and s.kafka.transactional_id is None


def test_model_copy_with_flat_names_rebuilds_the_groups() -> None:
    s = Settings()
    t = s.model_copy(
        update={
            "bootstrap_servers": "k:1",
            "allowed_buckets": ["x"],
            "alert_window_s": 60,
            "kafka_extra": {"a": "b"},
        }
    )
    assert (t.kafka.bootstrap_servers, t.kafka.extra, t.media.allowed_buckets) == ("k:1", {"a": "b"}, ["x"])
    assert t.alerts.window_s == 60
    assert (s.kafka.bootstrap_servers, s.media.allowed_buckets, s.alerts.window_s) == (
        "127.0.0.1:9092",
        ["guardstream-media"],
        3600,
    )
    # model_construct: no validator ran, the groups are built on first read
    c = Settings.model_construct(posts_topic="p", media_deadline_s=5.0)
    assert c.kafka.posts_topic == "p" and c.media.deadline_s == 5.0 and c.alerts == AlertSettings()


def test_groups_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.kafka.bootstrap_servers = "elsewhere:9092"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        KafkaSettings(kafka_extra={})  # type: ignore[call-arg]  # the group's name is `extra`


@pytest.mark.parametrize(
    ("var", "value", "reason"),
    [
        ("DELIVERY", "twice", "'at-least-once' or 'exactly-once'"),
        ("SESSION_TIMEOUT_MS", "10", "greater than or equal to 1000"),
        ("FETCH_CONCURRENCY", "0", "greater than or equal to 1"),
        ("ALERT_JOIN_THRESHOLD", "2", "less than or equal to 1"),
        ("MEDIA_DEADLINE_S", "0", "greater than 0"),
    ],
)
def test_an_invalid_group_value_names_the_variable(
    var: str, value: str, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"GUARDSTREAM_{var}", value)
    with pytest.raises(ValidationError) as exc:
        Settings()
    line = describe_validation(exc.value)
    assert f"--{var.lower().replace('_', '-')} / GUARDSTREAM_{var}={value!r}:" in line, line
    assert reason in line and "\n" not in line


def test_group_variables_are_known_names() -> None:
    assert unknown_variables({env_name(name): "1" for name in GROUP_VARIABLES}) == []


def test_settings_file_sets_group_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "gs.toml"
    toml.write_text(
        'bootstrap_servers = "kafka.example:9092"\nallowed_buckets = ["a", "b"]\nalert_min_authors = 2\n'
        '[kafka_extra]\n"security.protocol" = "SSL"\n'
    )
    for var, value in read_config_file(toml).items():
        monkeypatch.setenv(var, value)
    s = Settings()
    assert s.kafka.bootstrap_servers == "kafka.example:9092" and s.kafka.extra == {"security.protocol": "SSL"}
    assert s.media.allowed_buckets == ["a", "b"] and s.alerts.min_authors == 2


def test_client_configs_are_built_from_the_kafka_group() -> None:
    k = Settings(
        bootstrap_servers="k:1", group_id="g", session_timeout_ms=8000, kafka_extra={"client.id": "me"}
    ).kafka
    c, p = consumer_config(k), producer_config(k)
    assert (c["bootstrap.servers"], c["group.id"], c["session.timeout.ms"]) == ("k:1", "g", 8000)
    assert c["heartbeat.interval.ms"] == 2000 and c["client.id"] == p["client.id"] == "me"
    assert p["message.timeout.ms"] == 30_000


def test_a_variable_that_is_not_json_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic-settings decodes a dict-valued variable as JSON before validation: a SettingsError with a
    # traceback, not a ValidationError; every entry point names the variable, its value and the form
    from pydantic_settings import SettingsError

    from workers import preflight
    from workers.cli.base import CliError, load_settings
    from workers.settings import describe_settings_error

    monkeypatch.setenv("GUARDSTREAM_KAFKA_EXTRA", "security.protocol=SSL")
    with pytest.raises(SettingsError) as exc:
        Settings()
    line = describe_settings_error(exc.value)
    assert line.startswith("GUARDSTREAM_KAFKA_EXTRA='security.protocol=SSL': not valid JSON"), line
    assert "\n" not in line and '{"security.protocol"' in line
    with pytest.raises(CliError, match=re.escape(line)):
        load_settings()
    s, result = preflight.load_settings()
    assert s is None and not result.ok and result.detail == line


def test_transaction_timeout_reaches_the_transactional_producer() -> None:
    # GUARDSTREAM_TRANSACTION_TIMEOUT_MS was declared but never set on the producer
    from workers.preflight import check_settings

    k = Settings(transaction_timeout_ms=45_000).kafka
    assert "transactional.id" not in producer_config(k) and "transaction.timeout.ms" not in producer_config(k)
    p = producer_config(k, transactional_id="g-host")
    assert p["transactional.id"] == "g-host" and p["transaction.timeout.ms"] == 45_000
    # librdkafka refuses message.timeout.ms > transaction.timeout.ms: said by the pre-flight check, by name
    bad = check_settings(
        Settings(delivery="exactly-once", produce_timeout_s=90, transaction_timeout_ms=60_000)
    )
    assert (
        not bad.ok
        and "TRANSACTION_TIMEOUT_MS" in bad.detail
        and "GUARDSTREAM_PRODUCE_TIMEOUT_S" in (bad.fix or "")
    )
    assert check_settings(Settings(delivery="exactly-once")).ok


def test_a_bad_entry_of_a_dict_valued_variable_names_the_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    # the message once showed only the entry's value ("=1"), not which variable and which key held it
    from workers import preflight

    monkeypatch.setenv("GUARDSTREAM_KAFKA_EXTRA", '{"client.id": "me", "linger.ms": 5}')
    with pytest.raises(ValidationError) as exc:
        Settings()
    line = describe_validation(exc.value)
    assert line.startswith("--kafka-extra / GUARDSTREAM_KAFKA_EXTRA['linger.ms']=5: "), line
    _s, result = preflight.load_settings()
    assert result.detail.startswith("GUARDSTREAM_KAFKA_EXTRA['linger.ms']=5: "), result.detail


# ---- settings_environ: a parent's settings as its child's environment ------------------------------------
# text an environment can hold (no NUL, no lone surrogate)
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


def _value_of(name: str, info: FieldInfo) -> st.SearchStrategy[Any]:
    """Valid values of the setting: its type within its bounds (what a flag or a settings file gives)."""
    annotation, bounds = info.annotation, {type(m): m for m in info.metadata}
    optional = isinstance(annotation, types.UnionType) and type(None) in annotation.__args__
    if optional:
        (annotation,) = [a for a in annotation.__args__ if a is not type(None)]
    ge, gt = bounds.get(annotated_types.Ge), bounds.get(annotated_types.Gt)
    le = bounds.get(annotated_types.Le)
    low = ge.ge if ge else gt.gt if gt else None
    high = le.le if le else None
    strategy: st.SearchStrategy[Any]
    if annotation is bool:
        strategy = st.booleans()
    elif annotation is int:
        strategy = st.integers(int(low) + (gt is not None) if low is not None else None, high)
    elif annotation is float:
        strategy = st.floats(low, high, exclude_min=gt is not None, allow_nan=False, allow_infinity=False)
    elif isinstance(annotation, type) and issubclass(annotation, Enum):
        strategy = st.sampled_from(list(annotation))
    elif annotation in (str, Path):  # a path as the text a flag or a variable gives
        patterns = [m.pattern for m in info.metadata if getattr(m, "pattern", None)]
        strategy = st.from_regex(patterns[0], fullmatch=True) if patterns else _TEXT
    elif annotation == dict[str, str]:
        strategy = st.dictionaries(_TEXT, _TEXT, max_size=3)
    elif annotation == list[str]:
        strategy = st.lists(_TEXT, max_size=3)
    else:
        raise AssertionError(f"{name}: no values drawn for {annotation}")
    return st.none() | strategy if optional else strategy


_OVERRIDES = st.fixed_dictionaries(
    {}, optional={name: _value_of(name, info) for name, info in Settings.model_fields.items()}
)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure reproduces
    # the autouse clean_env runs once per test, not per example: each example clears GUARDSTREAM_* itself
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(_OVERRIDES)
def test_settings_environ_reads_back_as_the_same_settings(overrides: dict[str, Any]) -> None:
    s = Settings(**overrides)
    env = settings_environ(s)
    assert all(k.startswith("GUARDSTREAM_") for k in env)
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("GUARDSTREAM_")]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        assert Settings().model_dump() == s.model_dump(), env


def test_settings_environ_writes_what_differs_in_the_variables_own_form() -> None:
    assert settings_environ(Settings()) == {}
    s = Settings(
        bootstrap_servers="k:1",
        delivery="exactly-once",
        kafka_extra={"security.protocol": "SSL"},
        allowed_buckets=["a", "b"],
        cache_enabled=False,
        s3_endpoint_url=None,
        engine="vllm-server",
        max_batch_size=32,  # the default: left out
    )
    assert settings_environ(s) == {
        "GUARDSTREAM_BOOTSTRAP_SERVERS": "k:1",
        "GUARDSTREAM_DELIVERY": "exactly-once",
        "GUARDSTREAM_KAFKA_EXTRA": '{"security.protocol": "SSL"}',
        "GUARDSTREAM_ALLOWED_BUCKETS": "a,b",
        "GUARDSTREAM_CACHE_ENABLED": "false",
        "GUARDSTREAM_S3_ENDPOINT_URL": "",  # unset: AWS S3 itself
        "GUARDSTREAM_ENGINE": "vllm-server",
    }
    # a bucket name the comma split would not give back: JSON
    assert settings_environ(Settings(allowed_buckets=["[b", "c"]))["GUARDSTREAM_ALLOWED_BUCKETS"] == (
        '["[b", "c"]'
    )


def test_settings_environ_only_names_the_settings_asked_for() -> None:
    s = Settings(group_id="g", posts_topic="p")
    assert settings_environ(s, only=["group_id", "max_batch_size", "transactional_id", "max_in_flight"]) == {
        "GUARDSTREAM_GROUP_ID": "g",
        "GUARDSTREAM_MAX_BATCH_SIZE": "32",  # named: written though it is the default
        "GUARDSTREAM_TRANSACTIONAL_ID": "",  # unset, and "" reads as unset
        # MAX_IN_FLIGHT is unset too, but "" is no number: left out (unset is its default)
    }
    with pytest.raises(ValueError, match="not settings of Settings: group"):
        settings_environ(s, only=["group"])


def test_an_optional_setting_with_a_default_reads_an_empty_value_as_unset() -> None:
    # settings_environ leaves out an unset value it cannot write as "": that reads back only where unset
    # is the default, so every optional setting whose default is a value must read "" as unset
    for cls in (Settings, ConsoleSettings):
        for name, info in cls.model_fields.items():
            optional = isinstance(info.annotation, types.UnionType) and type(None) in info.annotation.__args__
            if optional and info.get_default(call_default_factory=True) is not None:
                assert name in EMPTY_IS_NONE, name


def test_console_settings_environ_reads_back(monkeypatch: pytest.MonkeyPatch) -> None:
    cs = ConsoleSettings(
        console_tokens="alice:0123456789abcdef", console_port=0, console_redis_url="redis://r/1", group_id="g"
    )
    for key, value in settings_environ(cs).items():
        monkeypatch.setenv(key, value)
    assert ConsoleSettings().model_dump() == cs.model_dump()


def test_child_environ_drops_the_parents_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # the parent's MAX_BATCH_SIZE=8 overridden back to the default: the child must not inherit the 8
    parent = {"PATH": "/bin", "GUARDSTREAM_MAX_BATCH_SIZE": "8", "GUARDSTREAM_CONFIG": "gs.toml"}
    env = child_environ(Settings(max_batch_size=32, group_id="g"), parent)
    assert env == {"PATH": "/bin", "GUARDSTREAM_GROUP_ID": "g"}
    monkeypatch.setenv("GUARDSTREAM_GROUP_ID", "other")  # default: this process's environment
    monkeypatch.setenv("NOT_A_SETTING", "kept")
    env = child_environ(Settings(group_id="guardstream-moderation"))
    assert "GUARDSTREAM_GROUP_ID" not in env and env["NOT_A_SETTING"] == "kept"
