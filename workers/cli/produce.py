"""``guardstream produce``: post JSON lines (or the sample feed) into the posts topic by hand."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from workers.cli.base import BootstrapOpt, CliError, S3EndpointOpt, UsageError, app, load_settings, log


@app.command()
def produce(
    source: Annotated[
        str | None,
        typer.Argument(help="JSON-lines file of posts, or - for stdin.", show_default="stdin"),
    ] = None,
    sample: Annotated[
        int | None,
        typer.Option(help="Instead of a file: the first N posts of the demo's sample feed.", min=1),
    ] = None,
    bucket: Annotated[
        str | None,
        typer.Option(help="Bucket for local images.", show_default="first of GUARDSTREAM_ALLOWED_BUCKETS"),
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send lines as they are (no schema check): to try dead letters.")
    ] = False,
    bootstrap_servers: BootstrapOpt = None,
    s3_endpoint_url: S3EndpointOpt = None,
) -> int:
    """Post JSON-lines events (or the sample feed) into the posts topic.

    Local images (file:// or paths relative to the file) are uploaded to the bucket and their refs
    rewritten to s3://bucket/key."""
    from botocore.exceptions import BotoCoreError, ClientError

    from workers.kafka.topics import produce_all
    from workers.media import make_s3_client
    from workers.produce import ProduceError, prepare_posts, sample_posts

    if sample is not None and source is not None:
        raise UsageError("give either a file of posts or --sample N, not both")
    s = load_settings(bootstrap_servers=bootstrap_servers, s3_endpoint_url=s3_endpoint_url)
    target = bucket or s.media.allowed_buckets[0]
    if target not in s.media.allowed_buckets:
        raise CliError(
            f"--bucket {target}: the worker only reads GUARDSTREAM_ALLOWED_BUCKETS {s.media.allowed_buckets}"
        )
    client = make_s3_client(s.media.s3_endpoint_url, s.media.s3_region, s.media.s3_max_attempts)
    uploaded: list[str] = []

    def upload(b: str, key: str, data: bytes) -> None:
        try:
            client.put_object(Bucket=b, Key=key, Body=data)
        except (BotoCoreError, ClientError) as exc:
            where = s.media.s3_endpoint_url or "AWS S3"
            raise CliError(
                f"cannot upload to s3://{b}/ at {where}: {exc} (check --s3-endpoint-url / "
                "GUARDSTREAM_S3_ENDPOINT_URL and the AWS credentials; nothing was produced)"
            ) from None
        uploaded.append(key)

    if sample is not None:
        try:
            items = sample_posts(sample, target, upload)
        except ProduceError as exc:  # --sample beyond the feed: a bad flag value
            raise UsageError(str(exc)) from None
    else:
        path = None if source in (None, "-") else Path(str(source))
        try:
            lines = sys.stdin.readlines() if path is None else path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise CliError(f"{source}: cannot read it ({exc.strerror})") from None
        base_dir = Path.cwd() if path is None else path.resolve().parent
        try:
            items = prepare_posts(
                lines, bucket=target, base_dir=base_dir, upload=upload, validate=not raw
            ).items
        except ProduceError as exc:
            raise CliError(f"{source or 'stdin'}: {exc} (nothing was produced)") from None
    try:
        n = produce_all(s.kafka.bootstrap_servers, s.kafka.posts_topic, items, extra=s.kafka.extra)
    except (
        RuntimeError
    ) as exc:  # unacknowledged after the flush timeout: a missing topic, an unreachable broker
        raise CliError(f"{exc} (is {s.kafka.bootstrap_servers} reachable, does the topic exist?)") from None
    print(f"produced {n} posts to {s.kafka.posts_topic}; uploaded {len(uploaded)} images to s3://{target}/")
    log.info("posts_produced", posts=n, topic=s.kafka.posts_topic, images=len(uploaded), bucket=target)
    return 0
