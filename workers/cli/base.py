"""What every command shares: the Typer app, option types tied to settings, the settings file, errors.

Precedence of a setting, highest first: a command-line flag, the environment (``GUARDSTREAM_*``), the
settings file (``--config guardstream.toml`` or ``.env``), the built-in default. The environment wins over
the file so a deployment can override one value of a shared file without editing it (the same order
pydantic-settings gives a ``.env`` file).
"""

from __future__ import annotations

import difflib
import json
import os
import signal
import threading
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

# Typer >= 0.24 vendors click as typer._click: its parsing errors are not the installed click's classes
try:
    from typer._click.exceptions import ClickException as ClickException
    from typer._click.exceptions import UsageError as UsageError
except ImportError:  # an older Typer on top of click
    from click.exceptions import ClickException as ClickException  # type: ignore[assignment]
    from click.exceptions import UsageError as UsageError  # type: ignore[assignment]

from guard.engines import EngineKind
from workers.settings import ENV_PREFIX, Settings, describe_invalid, describe_settings_error

log = structlog.get_logger("guardstream")

app = typer.Typer(
    name="guardstream",
    help="guardstream: a Kafka stream-processing moderation worker and the tools around it.",
    no_args_is_help=True,
    # an unexpected error is a bug report: a plain traceback, not a screen of rich locals
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)


class CliError(ClickException):
    """A bad value or a refused request, reported as one line (``guardstream: ...``), exit code 1."""


@contextmanager
def ctrl_c_requests_stop() -> Iterator[threading.Event]:
    """Within the block, the first Ctrl-C sets the yielded event (the command stops at its next safe
    point); a second one raises ``KeyboardInterrupt`` as usual.

    Why not let ``KeyboardInterrupt`` fly: raised inside a librdkafka call (``Producer.flush`` polls for
    signals while it waits), it surfaces as ``SystemError: ... returned NULL without setting an
    exception`` and a traceback instead of the resume hint. Off the main thread (where handlers cannot be
    installed) the event is simply never set."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def on_sigint(_signum: int, _frame: object) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _default_text(field: str) -> str:
    f = Settings.model_fields[field]
    d = f.get_default(call_default_factory=True)
    if d is None:
        return "unset"
    if isinstance(d, list):
        return ",".join(str(x) for x in d)
    return str(d.value) if isinstance(d, EngineKind) else str(d)


def setting(field: str, *flags: str, help: str, **kw: Any) -> Any:
    """An option that overrides the setting ``field``: its variable and its default (from ``Settings``)
    are shown in ``--help``; when the flag is absent the variable (or the settings file) applies."""
    return typer.Option(
        *flags,
        help=help,
        envvar=env_name(field),
        show_envvar=True,
        show_default=_default_text(field),
        **kw,
    )


# ---- options shared by several commands (each maps to one setting) ---------------------------------
BootstrapOpt = Annotated[
    str | None, setting("bootstrap_servers", "--bootstrap-servers", help="Kafka bootstrap servers.")
]
S3EndpointOpt = Annotated[
    str | None,
    setting("s3_endpoint_url", "--s3-endpoint-url", help="S3 API endpoint (MinIO, moto); empty for AWS S3."),
]
EngineOpt = Annotated[
    EngineKind | None, setting("engine", "--engine", help="Guard engine.", case_sensitive=False)
]
MaxBatchOpt = Annotated[
    int | None, setting("max_batch_size", "--max-batch-size", help="Posts per engine batch.", min=1)
]
MaxWaitOpt = Annotated[
    int | None, setting("max_wait_ms", "--max-wait-ms", help="Longest wait to fill a batch (ms).", min=0)
]
RedisOpt = Annotated[str | None, setting("redis_url", "--redis-url", help="Redis verdict cache URL.")]
TaxonomyOpt = Annotated[
    Path | None,
    setting(
        "taxonomy_path",
        "--taxonomy",
        help="Taxonomy YAML (default: the packaged ProGuard taxonomy).",
        exists=True,
        dir_okay=False,
    ),
]
GroupOpt = Annotated[str | None, setting("group_id", "--group-id", help="Consumer group of the worker.")]
MetricsPortOpt = Annotated[
    int | None,
    setting("metrics_port", "--metrics-port", help="Serve /metrics, /healthz, /readyz here.", min=0),
]


# GUARDSTREAM_* variables that are not settings: the settings file's path, and the browser test's knobs.
NOT_SETTINGS = frozenset({"GUARDSTREAM_CONFIG", "GUARDSTREAM_CHROMIUM", "GUARDSTREAM_SCREENSHOTS"})
_warned: set[str] = set()


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``GUARDSTREAM_*`` variables that name no setting, each with the closest known name (or None).

    A typo (``GUARDSTREAM_BOOTSTRAP_SERVER``) would otherwise leave the default in force, silently."""
    known = {env_name(f) for f in _known_fields()} | NOT_SETTINGS
    names = sorted(k.removeprefix(ENV_PREFIX) for k in known)  # compared without the shared prefix

    def closest(var: str) -> str | None:
        match = difflib.get_close_matches(var.removeprefix(ENV_PREFIX), names, n=1, cutoff=0.8)
        return ENV_PREFIX + match[0] if match else None

    return [(var, closest(var)) for var in sorted(environ) if var.startswith(ENV_PREFIX) and var not in known]


def load_settings(**overrides: Any) -> Settings:
    """``Settings`` from the environment (and settings file) with the given flags on top; a value that
    does not validate is one line naming the flag, its variable and the reason. Unknown ``GUARDSTREAM_*``
    variables are warned about once per process (not refused: a newer deployment may set a variable an
    older worker does not know)."""
    for var, close in unknown_variables(os.environ):
        if var not in _warned:
            _warned.add(var)
            log.warning(
                "unknown_setting_variable",
                variable=var,
                hint=f"did you mean {close}?" if close else "no setting has this name; it is ignored",
            )
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise CliError(describe_validation(exc)) from None
    except SettingsError as exc:  # a JSON variable that is not JSON
        raise CliError(describe_settings_error(exc)) from None


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        if not e.get("loc"):  # a check across settings: its message names the variables
            parts.append(e["msg"])
            continue
        flag = "--" + str(e["loc"][0]).replace("_", "-")
        parts.append(f"{flag} / {describe_invalid(e)}")
    return "; ".join(parts)


# ---- the settings file --------------------------------------------------------------------------------
def _known_fields() -> set[str]:
    from workers.console.settings import ConsoleSettings

    return set(ConsoleSettings.model_fields)


def _as_env_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | dict):
        return json.dumps(v)
    return str(v)


def read_config_file(path: Path) -> dict[str, str]:
    """``GUARDSTREAM_*`` variables from a TOML file (keys: setting names, ``bootstrap_servers = "..."``,
    or variable names, optionally under a ``[guardstream]`` table) or a ``.env`` file (``KEY=value``)."""
    try:
        if path.suffix == ".toml":
            doc: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
            doc = doc.get("guardstream", doc)
        else:
            from dotenv import dotenv_values

            doc = {k: v for k, v in dotenv_values(path).items() if v is not None}
    except OSError as exc:
        raise CliError(f"--config {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"--config {path}: not valid TOML ({exc})") from None
    known = _known_fields()
    out: dict[str, str] = {}
    for key, value in doc.items():
        field = key.lower().removeprefix(ENV_PREFIX.lower())
        if field not in known:
            close = difflib.get_close_matches(field, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise CliError(f"--config {path}: unknown setting {key!r}{hint}")
        if isinstance(value, dict) and field != "kafka_extra":
            raise CliError(f"--config {path}: {key} must be a value, not a table")
        out[env_name(field)] = _as_env_value(value)
    return out


def apply_config_file(path: Path) -> int:
    """Put the file's values into the environment where the environment has none (env wins over the file;
    subprocesses such as the demo's alerts app inherit them). Returns how many were applied."""
    applied = 0
    for var, value in read_config_file(path).items():
        if var not in os.environ:
            os.environ[var] = value
            applied += 1
    return applied


def writable_file(path: Path, flag: str = "--out") -> Path:
    """Fail before any work when ``path`` cannot be written (one line, not a traceback at the end)."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CliError(f"{flag} {path}: is a directory, expected a file")
    if not parent.is_dir():
        raise CliError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CliError(f"{flag} {path}: not writable")
    return path


def writable_dir(path: Path, flag: str = "--out") -> Path:
    """Like ``writable_file`` for an output directory (it may not exist yet; its parent must be writable)."""
    if path.exists() and not path.is_dir():
        raise CliError(f"{flag} {path}: exists and is not a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CliError(f"{flag} {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK):
        raise CliError(f"{flag} {path}: not writable ({probe} is read-only for this user)")
    return path
