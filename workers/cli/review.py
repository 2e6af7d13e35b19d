"""``guardstream review``: publish a human label for a post."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from workers.cli.base import BootstrapOpt, CliError, TaxonomyOpt, UsageError, app, load_settings, log
from workers.settings import Settings

if TYPE_CHECKING:
    pass


# `review` searches this many of the newest records of each partition of the verdicts and dead-letter
# topics: a typo is caught in a second or two, and a real post older than that takes --force.
REVIEW_LOOKBACK = 20_000


@app.command()
def review(
    post_id: Annotated[str, typer.Argument(help="The post to label.")],
    reviewer: Annotated[str, typer.Option(help="Who labels (recorded with the label).")],
    unsafe: Annotated[
        bool | None,
        typer.Option("--unsafe/--safe", help="The label (one of them is required).", show_default=False),
    ] = None,
    category: Annotated[str | None, typer.Option(help="Taxonomy id, e.g. C9S1.")] = None,
    novel: Annotated[
        str | None, typer.Option(help="Corrected novel-risk description (out-of-taxonomy).")
    ] = None,
    note: Annotated[str | None, typer.Option(help="Free-text note.")] = None,
    lookback: Annotated[
        int,
        typer.Option(
            help="Newest records per partition of the verdicts and dead-letter topics searched for the post.",
            min=1,
        ),
    ] = REVIEW_LOOKBACK,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Publish even if the post is not found (one older than --lookback, or past retention).",
        ),
    ] = False,
    bootstrap_servers: BootstrapOpt = None,
    taxonomy_path: TaxonomyOpt = None,
) -> int:
    """Publish a human review label for a post (it overrides the model's label in training exports).

    The post must be known, as in the review console: queued in the console's store, or with a verdict or
    dead letter among the newest --lookback records of each partition of those topics."""
    from guard.taxonomy import Taxonomy
    from workers.reviews import ReviewError, build_review, publish_reviews

    if unsafe is None:
        raise UsageError("review: give --unsafe or --safe")
    s = load_settings(bootstrap_servers=bootstrap_servers, taxonomy_path=taxonomy_path)
    try:
        ev = build_review(
            Taxonomy.load(s.engine_config.taxonomy_path),
            post_id=post_id,
            unsafe=unsafe,
            category=category,
            novel_risk=novel,
            reviewer_id=reviewer,
            note=note,
        )
    except ReviewError as exc:
        raise CliError(str(exc)) from None
    if not force:
        _require_known_post(s, ev.post_id, lookback)
    publish_reviews(s.kafka.bootstrap_servers, s.kafka.reviews_topic, [ev], extra=s.kafka.extra)
    log.info(
        "review_published",
        post_id=ev.post_id,
        unsafe=ev.unsafe,
        category=ev.category,
        topic=s.kafka.reviews_topic,
    )
    return 0


def _require_known_post(s: Settings, post_id: str, lookback: int) -> None:
    """Refuse a post id nothing knows (a typo would publish a label that never matches a post).

    The console's store first (one Redis call: every queued post, however old), then a bounded scan of
    the newest records of the verdicts and dead-letter topics, the topics every moderated post reaches
    (a label for a post the engine settled confidently is legitimate, and the console never queued it).
    Not a full scan: those topics grow without bound, and this must answer in seconds."""
    from confluent_kafka import KafkaException
    from pydantic import ValidationError

    from workers.console.settings import ConsoleSettings
    from workers.reviews import find_in_topics, known_to_console

    try:
        cs = ConsoleSettings(**s.model_dump(exclude_unset=True))
    except ValidationError:  # e.g. malformed console tokens: not this command's business
        cs = None
    if cs is not None and known_to_console(cs.store_url, cs.console_prefix, post_id):
        log.info("review_post_found", post_id=post_id, where="console store")
        return
    topics = [s.kafka.verdicts_topic, s.kafka.dlq_topic]
    try:
        where = find_in_topics(
            s.kafka.bootstrap_servers, topics, post_id, lookback=lookback, extra=s.kafka.extra
        )
    except (TimeoutError, KafkaException) as exc:
        raise CliError(f"review: could not search {', '.join(topics)} for {post_id!r}: {exc}") from None
    if where is None:
        raise CliError(
            f"review: post {post_id!r} not found (not queued in the review console, no verdict or dead "
            f"letter among the newest {lookback} records per partition of {', '.join(topics)}); "
            "check the id, or raise --lookback, or --force to publish anyway"
        )
    log.info("review_post_found", post_id=post_id, where=where)
