"""Pre-flight: validate the settings and reach every dependency before any post is read.

``guardstream check`` prints one line per dependency (settings, broker and topics, media bucket, Redis,
engine) and exits non-zero naming the fix; ``--settings-only`` stops after the settings. The worker can
run the same checks at start (``preflight(settings)`` raises ``PreflightError``), so a misconfigured
deployment fails at once with the fix in its log instead of dead-lettering posts or hanging.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError
from pydantic_settings import SettingsError

from guard.config import ServerConfig, TransformersConfig, VllmConfig
from guard.engines import EngineKind
from guard.types import GuardEngine, ModerationItem
from schemas.errors import EXIT_CONFIG, FatalError
from workers.kafka.config import admin_config
from workers.secrets import mask_url, mask_urls_in
from workers.settings import DeliveryMode, Settings, describe_invalid, describe_settings_error

KNOWN_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
# Working memory of one decode per byte of a pixel at the cap (4 B/px stored, x1.5 while downscaling).
_DECODE_BYTES_PER_CAPPED_PIXEL = 6


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    # a dependency that is down (it may come back: a server still loading its model, a restart), not a
    # setting that is wrong; the worker starts anyway and rides it out as an outage
    transient: bool = False

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        tail = f" -> fix: {self.fix}" if self.fix and not self.ok else ""
        return mask_urls_in(f"{status} {self.name:<9} {self.detail}{tail}")


class PreflightError(FatalError):
    """A check failed at start (a wrong setting, a missing topic, an unreadable bucket): waiting does not
    fix it, so the worker does not start (exit 2); ``failures`` name each fix."""

    exit_code = EXIT_CONFIG

    def __init__(self, failures: list[CheckResult]) -> None:
        super().__init__("; ".join(f.line() for f in failures))
        self.failures = failures


def _env(field: str) -> str:
    return f"GUARDSTREAM_{field.upper()}"


def load_settings(**overrides: Any) -> tuple[Settings | None, CheckResult]:
    """Settings from the environment (and CLI overrides), each validation error named by its variable."""
    try:
        s = Settings(**overrides)
    except ValidationError as exc:
        errs = [describe_invalid(e) for e in exc.errors()]
        return None, CheckResult("settings", False, "; ".join(errs)[:600], "correct the variables named")
    except SettingsError as exc:  # a JSON variable that is not JSON
        why = describe_settings_error(exc)
        return None, CheckResult("settings", False, why, "correct the variable's value")
    return s, check_settings(s)


def check_settings(s: Settings) -> CheckResult:
    """What pydantic's per-field validation cannot see: combinations and references."""
    problems: list[tuple[str, str]] = []
    if not s.media.allowed_buckets:
        problems.append(("no media bucket is allowed", "set GUARDSTREAM_ALLOWED_BUCKETS=bucket1,bucket2"))
    proto = s.kafka.extra.get("security.protocol", "PLAINTEXT").upper()
    if proto not in KNOWN_PROTOCOLS:
        problems.append(
            (f"kafka_extra security.protocol={proto!r}", f"use one of {', '.join(KNOWN_PROTOCOLS)}")
        )
    if proto.startswith("SASL") and not s.kafka.extra.get(
        "sasl.mechanism", s.kafka.extra.get("sasl.mechanisms")
    ):
        problems.append(("SASL without sasl.mechanism", 'add "sasl.mechanism" to GUARDSTREAM_KAFKA_EXTRA'))
    k = s.kafka
    if k.delivery is DeliveryMode.EXACTLY_ONCE and k.produce_timeout_s * 1000 > k.transaction_timeout_ms:
        # librdkafka refuses a transactional producer whose message.timeout.ms exceeds its transaction's
        problems.append(
            (
                f"PRODUCE_TIMEOUT_S={k.produce_timeout_s:g} is longer than TRANSACTION_TIMEOUT_MS="
                f"{k.transaction_timeout_ms} (exactly-once)",
                "lower GUARDSTREAM_PRODUCE_TIMEOUT_S or raise GUARDSTREAM_TRANSACTION_TIMEOUT_MS",
            )
        )
    need = s.media.max_image_pixels * _DECODE_BYTES_PER_CAPPED_PIXEL
    if need > s.media.decode_budget_bytes:
        problems.append(
            (
                f"an image at MAX_IMAGE_PIXELS needs ~{need >> 20} MiB to decode, over the "
                f"{s.media.decode_budget_bytes >> 20} MiB decode budget (every such image would be refused)",
                "raise GUARDSTREAM_DECODE_BUDGET_BYTES or lower GUARDSTREAM_MAX_IMAGE_PIXELS",
            )
        )
    for name in ("redis_url", "s3_endpoint_url", "vllm_server_url"):
        url = getattr(s, name)
        if url is not None and not (urlsplit(url).scheme and urlsplit(url).netloc):
            problems.append(
                (f"{_env(name)}={mask_url(url)!r} is not a URL", f"set {_env(name)}=scheme://host:port")
            )
    c = s.engine_config
    model = c.model if isinstance(c, VllmConfig | TransformersConfig) else None
    if model is not None and model.startswith(("/", ".")) and not Path(model).is_dir():
        problems.append((f"model directory {model} does not exist", "set GUARDSTREAM_VLLM_MODEL"))
    if s.engine is EngineKind.VLLM and importlib.util.find_spec("vllm") is None:
        problems.append(
            ("engine vllm but vllm is not installed", "pip install -e '.[gpu]' on a CUDA machine")
        )
    if problems:
        return CheckResult(
            "settings", False, "; ".join(p for p, _ in problems), "; ".join(f for _, f in problems)
        )
    return CheckResult(
        "settings", True, f"valid (engine {s.engine.value}, delivery {s.kafka.delivery.value})"
    )


def check_broker(s: Settings, timeout_s: float = 5.0) -> CheckResult:
    from confluent_kafka.admin import AdminClient

    fix_reach = "check GUARDSTREAM_BOOTSTRAP_SERVERS and GUARDSTREAM_KAFKA_EXTRA (TLS/SASL)"
    try:
        # log_level 2: the failure is reported on one line below, not by librdkafka every 50 ms
        cfg = {"log_level": 2, **admin_config(s.kafka.bootstrap_servers, s.kafka.extra)}
        md = AdminClient(cfg).list_topics(timeout=timeout_s)
    except Exception as exc:
        return CheckResult(
            "broker", False, f"{s.kafka.bootstrap_servers} unreachable: {exc}"[:300], fix_reach
        )
    wanted = [s.kafka.posts_topic, s.kafka.verdicts_topic, s.kafka.novel_risk_topic, s.kafka.dlq_topic]
    missing = [t for t in wanted if t not in md.topics]
    if missing:
        return CheckResult(
            "broker",
            False,
            f"{s.kafka.bootstrap_servers}: topic(s) {missing} do not exist",
            "create them (guardstream up creates local ones) or set GUARDSTREAM_*_TOPIC",
        )
    parts = len(md.topics[s.kafka.posts_topic].partitions)
    return CheckResult(
        "broker", True, f"{s.kafka.bootstrap_servers}: {len(wanted)} topics, posts has {parts} partitions"
    )


def check_bucket(s: Settings) -> CheckResult:
    from botocore.exceptions import BotoCoreError, ClientError

    from workers.media import make_s3_client

    client = make_s3_client(s.media.s3_endpoint_url, s.media.s3_region, 1)
    where = s.media.s3_endpoint_url or "AWS S3"
    for bucket in s.media.allowed_buckets:
        try:
            client.list_objects_v2(Bucket=bucket, MaxKeys=1)  # readable with these credentials
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            fix = (
                f"create bucket {bucket!r} or fix GUARDSTREAM_ALLOWED_BUCKETS"
                if code == "NoSuchBucket"
                else "give these credentials s3:ListBucket and s3:GetObject on the bucket (AWS_* / IAM role)"
            )
            return CheckResult("bucket", False, f"{bucket} at {where}: {code or exc}", fix)
        except BotoCoreError as exc:
            fix = (
                "provide AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or an IAM role)"
                if "credentials" in str(exc).lower()
                else "check GUARDSTREAM_S3_ENDPOINT_URL and that S3 is reachable"
            )
            return CheckResult(
                "bucket", False, f"{bucket} at {where}: {type(exc).__name__}: {exc}"[:300], fix
            )
    return CheckResult("bucket", True, f"{', '.join(s.media.allowed_buckets)} readable at {where}")


def check_redis(s: Settings) -> CheckResult:
    import redis

    if not s.cache.enabled:
        return CheckResult("redis", True, "cache disabled (GUARDSTREAM_CACHE_ENABLED=false)")
    client = redis.Redis.from_url(s.cache.url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        return CheckResult(
            "redis", False, f"{mask_url(s.cache.url)}: {exc}", "put the password in GUARDSTREAM_REDIS_URL"
        )
    except redis.RedisError as exc:
        return CheckResult(
            "redis",
            False,
            f"{mask_url(s.cache.url)}: {exc}"[:300],
            "start Redis or set GUARDSTREAM_REDIS_URL (GUARDSTREAM_CACHE_ENABLED=false: run without cache)",
        )
    finally:
        client.close()
    return CheckResult("redis", True, f"{mask_url(s.cache.url)} answers")


def check_engine(s: Settings, engine: GuardEngine | None = None) -> CheckResult:
    """A probe request: for in-process engines build it (unless given) and judge one text; for
    ``vllm-server`` ask ``GET /models`` and look for the served model name."""
    if isinstance(s.engine_config, ServerConfig) and engine is None:
        return _probe_server(s.engine_config)
    try:
        if engine is None:
            from guard.engines import build_engine

            engine = build_engine(s.engine_config)
        (v,) = engine.moderate([ModerationItem("preflight-probe", "Hello, is anyone there?")])
    except Exception as exc:
        return CheckResult(
            "engine",
            False,
            f"{s.engine.value}: {type(exc).__name__}: {exc}"[:300],
            "check the GUARDSTREAM_VLLM_* / GUARDSTREAM_CPU_* settings and the model files",
        )
    return CheckResult("engine", True, f"{engine.name} {engine.model_version}: probe judged (safe={v.safe})")


def _probe_server(c: ServerConfig) -> CheckResult:
    """``GET {VLLM_SERVER_URL}/models``: reachable, accepted, and serving ``VLLM_SERVER_MODEL``. A server
    that cannot be reached or answers 5xx is ``transient`` (``vllm serve`` takes minutes to load a model);
    a refusal (401/403), a wrong URL (404, not a model list) or a model it does not serve is a setting."""
    import httpx

    url = c.base_url.rstrip("/") + "/models"
    where = f"vllm-server {mask_url(url)}"
    headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key else {}
    fix_reach = "start `vllm serve` or fix GUARDSTREAM_VLLM_SERVER_URL"
    try:
        r = httpx.get(url, headers=headers, timeout=5.0)
    except httpx.HTTPError as exc:
        detail = f"{where}: {type(exc).__name__}: {mask_urls_in(str(exc))}"[:300]
        return CheckResult("engine", False, detail, fix_reach, transient=True)
    if r.status_code >= 500:
        return CheckResult("engine", False, f"{where}: HTTP {r.status_code}", fix_reach, transient=True)
    if r.status_code in (401, 403):
        return CheckResult(
            "engine",
            False,
            f"{where}: HTTP {r.status_code} (refused)",
            "set GUARDSTREAM_VLLM_SERVER_API_KEY (or the credentials in GUARDSTREAM_VLLM_SERVER_URL)",
        )
    try:
        r.raise_for_status()
        served = [m.get("id") for m in r.json().get("data", [])]
    except Exception as exc:
        return CheckResult(
            "engine",
            False,
            f"{where}: not a model list ({type(exc).__name__}: {mask_urls_in(str(exc))})"[:300],
            "set GUARDSTREAM_VLLM_SERVER_URL to the OpenAI API root of `vllm serve` (ending in /v1)",
        )
    if c.model not in served:
        return CheckResult(
            "engine",
            False,
            f"{where} serves {served}, not {c.model!r}",
            "set GUARDSTREAM_VLLM_SERVER_MODEL to the --served-model-name",
        )
    return CheckResult("engine", True, f"{where} serves {c.model}")


CHECKS: tuple[tuple[str, Callable[..., CheckResult]], ...] = (
    ("broker", check_broker),
    ("bucket", check_bucket),
    ("redis", check_redis),
)


def run_checks(
    s: Settings, *, engine: GuardEngine | None = None, probe_engine: bool = True
) -> list[CheckResult]:
    results = [check_settings(s)]
    results += [fn(s) for _, fn in CHECKS]
    if probe_engine:
        results.append(check_engine(s, engine))
    return results


def preflight(
    s: Settings, *, engine: GuardEngine | None = None, probe_engine: bool = True
) -> list[CheckResult]:
    """The worker's start-up gate: every check; ``PreflightError`` (naming the fixes) on any failure."""
    results = run_checks(s, engine=engine, probe_engine=probe_engine)
    failures = [r for r in results if not r.ok]
    if failures:
        raise PreflightError(failures)
    return results


def summary(results: list[CheckResult]) -> dict[str, Any]:
    return {r.name: ("ok" if r.ok else "FAIL") for r in results}
