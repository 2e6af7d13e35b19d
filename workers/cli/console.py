"""``guardstream console``: serve the review console."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from workers.cli.base import (
    BootstrapOpt,
    CliError,
    EngineOpt,
    MaxBatchOpt,
    MaxWaitOpt,
    RedisOpt,
    S3EndpointOpt,
    TaxonomyOpt,
    app,
    load_settings,
)


@app.command()
def console(
    bootstrap_servers: BootstrapOpt = None,
    s3_endpoint_url: S3EndpointOpt = None,
    engine: EngineOpt = None,
    max_batch_size: MaxBatchOpt = None,
    max_wait_ms: MaxWaitOpt = None,
    redis_url: RedisOpt = None,
    taxonomy_path: TaxonomyOpt = None,
    host: Annotated[
        str | None,
        typer.Option(
            help="Bind address.",
            envvar="GUARDSTREAM_CONSOLE_HOST",
            show_envvar=True,
            show_default="127.0.0.1",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Port.",
            envvar="GUARDSTREAM_CONSOLE_PORT",
            show_envvar=True,
            show_default="8080",
            min=0,
            max=65535,
        ),
    ] = None,
) -> int:
    """Serve the review console (queue, posts, clusters, audits); binds 127.0.0.1 by default."""
    from pydantic import ValidationError

    from workers.cli.base import describe_validation
    from workers.console.server import run_blocking
    from workers.console.settings import ConsoleSettings

    base = load_settings(
        bootstrap_servers=bootstrap_servers,
        s3_endpoint_url=s3_endpoint_url,
        engine=engine,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        redis_url=redis_url,
        taxonomy_path=taxonomy_path,
    )
    try:
        s = ConsoleSettings(**base.model_dump(exclude_unset=True))
    except ValidationError as exc:
        raise CliError(describe_validation(exc)) from None
    if host:
        s = s.model_copy(update={"console_host": host})
    if port is not None:
        s = s.model_copy(update={"console_port": port})
    return run_blocking(s, reviewer=os.environ.get("USER") or "reviewer")
