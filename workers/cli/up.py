"""``guardstream up``: the embedded local stack (broker, S3 server, Redis) until Ctrl-C."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from workers.cli.base import (
    CliError,
    EngineOpt,
    MaxBatchOpt,
    MaxWaitOpt,
    RedisOpt,
    TaxonomyOpt,
    app,
    load_settings,
    log,
)
from workers.cli.topics import worker_topics


@app.command()
def up(
    engine: EngineOpt = None,
    max_batch_size: MaxBatchOpt = None,
    max_wait_ms: MaxWaitOpt = None,
    redis_url: RedisOpt = None,
    taxonomy_path: TaxonomyOpt = None,
    broker_port: Annotated[int, typer.Option(help="Port of the embedded broker.", min=1, max=65535)] = 9092,
    s3_port: Annotated[int, typer.Option(help="Port of the embedded S3 server.", min=1, max=65535)] = 9000,
    storage: Annotated[
        str,
        typer.Option(help="memory://tansu/ or s3://BUCKET/ (durable; needs AWS_ENDPOINT for MinIO/moto)."),
    ] = "memory://tansu/",
) -> int:
    """Start the local broker + S3 server (+ Redis) in the foreground until Ctrl-C."""
    import signal

    import boto3

    from infra.stack import LocalStack, StackError, create_topics, ensure_bucket
    from workers.secrets import mask_url

    def on_sigterm(_sig: int, _frame: object) -> None:
        raise SystemExit(0)  # unwinds through stack.stop(): the broker and a Redis we started go too

    signal.signal(signal.SIGTERM, on_sigterm)

    s = load_settings(
        engine=engine,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        redis_url=redis_url,
        taxonomy_path=taxonomy_path,
    )
    try:
        stack = LocalStack(
            broker_port=broker_port, s3_port=s3_port, redis_url=s.cache.url, storage=storage
        ).start()
    except StackError as exc:  # a busy port, no redis-server: one line, exit 1, nothing left running
        raise CliError(str(exc)) from None
    try:
        create_topics(stack.broker.bootstrap, worker_topics(s))
        ensure_bucket(boto3.client("s3", endpoint_url=stack.s3.endpoint), s.media.allowed_buckets[0])
        log.info(
            "stack_up",
            broker=stack.broker.bootstrap,
            s3=stack.s3.endpoint,
            redis=mask_url(s.cache.url),
            topics=list(worker_topics(s)),
            bucket=s.media.allowed_buckets[0],
            hint="Ctrl-C to stop",
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
