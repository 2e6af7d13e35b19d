"""Operations: ``check`` (pre-flight), ``redrive`` (dead letters back to posts), ``console``, ``schemas``."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from guard.engines import EngineKind
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
    unknown_variables,
)


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


@app.command()
def redrive(
    code: Annotated[list[str], typer.Option(help="Error code to redrive (repeatable).")],
    bootstrap_servers: BootstrapOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be redriven; write nothing.")
    ] = False,
    limit: Annotated[
        int | None, typer.Option(help="Redrive at most this many dead letters.", min=1, show_default="all")
    ] = None,
) -> int:
    """Re-process dead letters of chosen error codes (idempotent)."""
    from schemas.events import ErrorCode
    from workers.redrive import redrive as run_redrive

    s = load_settings(bootstrap_servers=bootstrap_servers)
    known = {c.value for c in ErrorCode}
    unknown = sorted(set(code) - known)
    if unknown:
        raise CliError(f"unknown error code(s) {unknown}; choose from {sorted(known)}")
    rep = run_redrive(
        s.bootstrap_servers,
        dlq_topic=s.dlq_topic,
        posts_topic=s.posts_topic,
        codes=set(code),
        dry_run=dry_run,
        limit=limit,
        kafka_extra=s.kafka_extra,
    )
    verb = "would redrive" if rep.dry_run else "redriven"
    print(
        f"matched {rep.matched}, already redriven {rep.already}, unrecoverable {rep.unrecoverable}, "
        f"{verb} {sum(rep.by_code.values())} {dict(rep.by_code)} -> {s.posts_topic}"
    )
    return 0


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


@app.command()
def schemas() -> int:
    """Write the JSON Schema files of the events to schemas/json/."""
    from schemas.export import main

    main()
    return 0
