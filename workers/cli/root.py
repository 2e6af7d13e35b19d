"""The root of the command line: ``--version``, ``--config``, logging, and the settings gate."""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from workers.cli.base import app, apply_config_file
from workers.observability.logging import configure_logging
from workers.settings import Settings


def package_version() -> str:
    try:
        return version("guardstream")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"guardstream {package_version()}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="GUARDSTREAM_CONFIG",
            show_envvar=True,
            help="Settings file: TOML (setting = value) or .env (GUARDSTREAM_X=value). "
            "Precedence: flags > environment > this file > defaults.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            "--log-format",
            help="auto | json | console.",
            envvar="GUARDSTREAM_LOG_FORMAT",
            show_envvar=True,
            show_default="auto",
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            help="DEBUG, INFO, WARNING ...",
            envvar="GUARDSTREAM_LOG_LEVEL",
            show_default="INFO",
        ),
    ] = None,
    _version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    if config is not None:
        apply_config_file(config)
    cmd = ctx.invoked_subcommand
    try:
        env = Settings()
    except (ValidationError, SettingsError) as exc:
        if cmd != "check":  # `check` reports each invalid variable itself
            from workers.preflight import load_settings

            print(load_settings()[1].line(), file=sys.stderr)
            raise SystemExit(2) from exc
        env = Settings.model_construct()
    if log_format is not None and log_format not in ("auto", "json", "console"):
        raise typer.BadParameter(
            f"{log_format!r} is not one of auto, json, console", param_hint="--log-format"
        )
    # the demo prints its own tables; per-post log lines would drown them unless asked for
    quiet = cmd == "demo" and "GUARDSTREAM_LOG_LEVEL" not in os.environ
    configure_logging(log_format or env.log_format, log_level or ("WARNING" if quiet else env.log_level))
