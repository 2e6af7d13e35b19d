"""Human review labels: one validation and one publish path, shared by ``guardstream review`` and the
review console, so a label from either reaches the reviews topic as the same ``ReviewEvent``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from guard.taxonomy import Taxonomy
from schemas.events import ReviewEvent


class ReviewError(ValueError):
    """A label that must not be published (contradictory, or a category outside the taxonomy)."""


def build_review(
    taxonomy: Taxonomy,
    *,
    post_id: str,
    unsafe: bool,
    reviewer_id: str,
    category: str | None = None,
    novel_risk: str | None = None,
    note: str | None = None,
) -> ReviewEvent:
    """Validate a label and return its event. Blank strings count as absent.

    A *safe* label with a category or a risk description contradicts itself (the export would have to
    pick one); it is refused rather than silently trimmed, so the reviewer sees what was wrong.
    """
    category = (category or "").strip().upper() or None
    novel_risk = " ".join((novel_risk or "").split()) or None
    note = (note or "").strip() or None
    if not unsafe and (category or novel_risk):
        raise ReviewError(
            "contradictory label: a post labelled safe cannot carry a category or a risk description"
        )
    if category is not None and taxonomy.resolve(category) is None:
        raise ReviewError(f"category {category!r} is not in the taxonomy")
    try:
        return ReviewEvent(
            post_id=post_id,
            unsafe=unsafe,
            category=category,
            novel_risk=novel_risk,
            reviewer_id=reviewer_id,
            note=note,
        )
    except ValueError as exc:  # pydantic: empty post id / reviewer, post id too long
        raise ReviewError(f"invalid review: {exc}") from None


def publish_reviews(
    bootstrap: str, topic: str, events: Sequence[ReviewEvent], extra: Mapping[str, str] | None = None
) -> None:
    """Publish to the reviews topic keyed by post id (the export keeps the latest label per post)."""
    from workers.kafka.admin import create_topics
    from workers.kafka.topics import produce_all

    create_topics(bootstrap, {topic: 1}, extra=extra)
    produce_all(
        bootstrap,
        topic,
        [(ev.post_id.encode(), ev.model_dump_json().encode()) for ev in events],
        extra=extra,
    )
