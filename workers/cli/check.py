"""``guardstream check``: the pre-flight of settings, broker and topics, bucket, Redis and engine."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from guard.engines import EngineKind
from workers.cli.base import BootstrapOpt, RedisOpt, S3EndpointOpt, app, unknown_variables


@app.command()
def check(
    bootstrap_servers: BootstrapOpt = None,
    s3_endpoint_url: S3EndpointOpt = None,
    redis_url: RedisOpt = None,
    # no envvar here: `check` reports an invalid GUARDSTREAM_ENGINE itself, with the other variables
    engine: Annotated[
        EngineKind | None,
        typer.Option(help="Guard engine (default: GUARDSTREAM_ENGINE).", case_sensitive=False),
    ] = None,
    settings_only: Annotated[
        bool, typer.Option("--settings-only", help="Validate the settings; contact nothing.")
    ] = False,
    skip_engine: Annotated[
        bool, typer.Option("--skip-engine", help="Do not build or probe the engine.")
    ] = False,
) -> int:
    """Pre-flight: validate settings and reach broker, bucket, Redis, engine (exit 2 naming the fix)."""
    from workers.preflight import check_broker, check_bucket, check_engine, check_redis
    from workers.preflight import load_settings as preflight_settings

    overrides = {
        k: v
        for k, v in {
            "bootstrap_servers": bootstrap_servers,
            "engine": engine,
            "redis_url": redis_url,
            "s3_endpoint_url": s3_endpoint_url,
        }.items()
        if v is not None
    }
    s, first = preflight_settings(**overrides)
    results = [first]
    if s is not None and not settings_only:
        results += [check_broker(s), check_bucket(s), check_redis(s)]
        if not skip_engine:
            results.append(check_engine(s))
    for r in results:
        print(r.line(), flush=True)
    for var, close in unknown_variables(os.environ):  # a warning, not a failure (see load_settings)
        print(f"warn settings  {var} is not a setting; {f'did you mean {close}?' if close else 'ignored'}")
    return 0 if all(r.ok for r in results) else 2
