"""``guardstream worker``: run the moderation worker (pre-flight first)."""

from __future__ import annotations

from typing import Annotated, Protocol

import typer

from schemas.errors import EXIT_OUTAGE, FatalError, InfrastructureError
from workers.cli.base import (
    BootstrapOpt,
    EngineOpt,
    GroupOpt,
    MaxBatchOpt,
    MaxWaitOpt,
    MetricsPortOpt,
    RedisOpt,
    S3EndpointOpt,
    TaxonomyOpt,
    app,
    load_settings,
    log,
)
from workers.settings import Settings


class _Stats(Protocol):
    consumed: int
    verdicts: int
    dead_letters: int
    batches: int


class _Runnable(Protocol):
    """What ``run_worker`` needs of a worker (``KafkaWorker``; a fake in the tests)."""

    def run(self, *, until_drained: bool = False) -> _Stats: ...


@app.command()
def worker(
    bootstrap_servers: BootstrapOpt = None,
    s3_endpoint_url: S3EndpointOpt = None,
    engine: EngineOpt = None,
    max_batch_size: MaxBatchOpt = None,
    max_wait_ms: MaxWaitOpt = None,
    redis_url: RedisOpt = None,
    taxonomy_path: TaxonomyOpt = None,
    group_id: GroupOpt = None,
    metrics_port: MetricsPortOpt = None,
    until_drained: Annotated[
        bool, typer.Option("--until-drained", help="Exit once the posts topic is consumed.")
    ] = False,
    skip_preflight: Annotated[
        bool,
        typer.Option(
            "--skip-preflight",
            help="Start without the pre-flight checks of `guardstream check` (broker and topics, bucket, "
            "Redis, and a vllm-server's model list). By default a failing check stops the worker at start "
            "with exit code 2 and the fix.",
        ),
    ] = False,
) -> int:
    """Run the moderation worker (SIGTERM/Ctrl-C: finish the batch, commit, exit 0)."""
    from workers.observability.metrics import start_metrics_server
    from workers.wiring import build_worker

    s = load_settings(
        bootstrap_servers=bootstrap_servers,
        s3_endpoint_url=s3_endpoint_url,
        engine=engine,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        redis_url=redis_url,
        taxonomy_path=taxonomy_path,
        group_id=group_id,
        metrics_port=metrics_port,
    )
    if not skip_preflight:
        from guard.engines import require_engine_extras

        require_engine_extras(s.engine)  # a missing extra is said first: nothing else can fix it
        _preflight_or_exit(s)
    if s.metrics_port:
        from workers.observability.build_info import record_build_info

        record_build_info(s.engine.value)  # guardstream_build_info{version, engine, ...} for the dashboard
        start_metrics_server(s.metrics_port, s.metrics_host)
    w = build_worker(s)
    w.install_signal_handlers()
    return run_worker(w, until_drained=until_drained)


def run_worker(w: _Runnable, *, until_drained: bool = False) -> int:
    """Run the worker to its end; the process's exit code. A ``FatalError`` is its own ``exit_code`` (3: a
    dependency past its deadline, an unacknowledged publish; 2: a configuration problem), logged as
    ``worker_failed``. An ``InfrastructureError`` is one the worker rides out itself; one that reaches
    here is an outage it did not outlast: exit 3 as well. Either way nothing of the unfinished work was
    committed: it is re-delivered when a worker runs again."""
    try:
        stats = w.run(until_drained=until_drained)
    except (FatalError, InfrastructureError) as exc:
        code = exc.exit_code if isinstance(exc, FatalError) else EXIT_OUTAGE
        log.error("worker_failed", error=str(exc), error_class=type(exc).__name__, exit_code=code)
        return code
    log.info(
        "worker_stopped",
        consumed=stats.consumed,
        verdicts=stats.verdicts,
        dead_letters=stats.dead_letters,
        batches=stats.batches,
    )
    return 0


def _preflight_or_exit(s: Settings) -> None:
    """The checks of ``guardstream check`` at start, before anything is consumed.

    A missing topic, an unreadable bucket or a wrong setting does not heal by waiting: the worker stops
    with exit code 2 and each fix named. Redis is the exception: the cache is optional, so a Redis that
    is down is a warning and the worker runs without it (it reconnects by itself).

    The engine: a ``vllm-server`` is probed (``GET /models``): a server that does not serve
    ``VLLM_SERVER_MODEL``, refuses the key or is not an OpenAI API at that URL is exit 2 as well; one that
    cannot be reached yet (still loading its model) is a warning, and the worker rides it out as an engine
    outage (exit 3 past ``ENGINE_DEADLINE_S``). In-process engines are built next, and the build is
    their probe: they are not probed twice."""
    import sys

    from guard.engines import EngineKind
    from workers.preflight import PreflightError, run_checks

    results = run_checks(s, probe_engine=s.engine is EngineKind.VLLM_SERVER)
    for r in results:
        if not r.ok and r.name == "redis":
            log.warning("preflight_redis_unavailable", detail=r.detail, fix=r.fix)
        elif not r.ok and r.name == "engine" and r.transient:
            log.warning("preflight_engine_unavailable", detail=r.detail, fix=r.fix)
    failures = [
        r for r in results if not r.ok and r.name != "redis" and not (r.name == "engine" and r.transient)
    ]
    if failures:
        for r in failures:
            print(r.line(), file=sys.stderr)
        log.error("preflight_failed", failures=[r.name for r in failures], exit_code=PreflightError.exit_code)
        raise typer.Exit(PreflightError.exit_code)
