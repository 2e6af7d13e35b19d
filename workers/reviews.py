"""Human review labels: one validation and one publish path, shared by ``guardstream review`` and the
review console, so a label from either reaches the reviews topic as the same ``ReviewEvent``; and the
lookup by which ``guardstream review`` refuses a post id nothing knows (as the console refuses one)."""

from __future__ import annotations

import json
import time
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


def known_to_console(store_url: str, prefix: str, post_id: str, timeout_s: float = 1.0) -> bool:
    """Whether the review console's store holds this post (the console's own test for a 404): one Redis
    call. An unreachable store answers False (the topics are searched next), quickly."""
    import redis

    from workers.console.store import QueueStore

    try:
        r = redis.Redis.from_url(store_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(r.exists(QueueStore.item_key(prefix, post_id)))
        finally:
            r.close()
    except redis.RedisError:
        return False


def find_in_topics(
    bootstrap: str,
    topics: Sequence[str],
    post_id: str,
    *,
    lookback: int,
    extra: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> str | None:
    """Where (``topic[partition]@offset``) a verdict or dead letter for ``post_id`` is, among the newest
    ``lookback`` records of each partition of ``topics``; None when there is none.

    One assign-only consumer reads all the partitions' tails at once and stops at the first match. A
    record counts only when its JSON ``post_id`` is the id (keys are not trusted: a dead letter keeps the
    original record's key, whatever it was); the JSON is parsed only for records whose bytes contain the
    quoted id. As ``read_records``, the end is the watermark passed and an empty fetch (Tansu's watermark
    is the last batch's base offset + 1)."""
    from confluent_kafka import Consumer, TopicPartition

    from workers.kafka.config import reader_config

    needle = json.dumps(post_id, ensure_ascii=False).encode()
    c = Consumer(reader_config(bootstrap, extra))
    try:
        md = c.list_topics(timeout=timeout_s)
        starts: list[TopicPartition] = []
        ends: dict[tuple[str, int], int] = {}
        for topic in topics:
            if topic not in md.topics:
                continue
            for p in sorted(md.topics[topic].partitions):
                lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s, cached=False)
                if hi > lo:
                    starts.append(TopicPartition(topic, p, max(lo, hi - lookback)))
                    ends[(topic, p)] = hi
        if not starts:
            return None
        c.assign(starts)
        reached: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msgs = c.consume(1000, 0.2)
            for m in msgs:
                name, part, off = m.topic(), m.partition(), m.offset()
                if m.error() or name is None or part is None or off is None:
                    continue
                value = m.value() or b""
                if needle in value and _post_id_of(value) == post_id:
                    return f"{name}[{part}]@{off}"
                reached[(name, part)] = off + 1
            if not msgs and all(reached.get(tp, 0) >= hi for tp, hi in ends.items()):
                return None
        raise TimeoutError(f"searching {', '.join(topics)} for {post_id!r} took over {timeout_s:.0f} s")
    finally:
        c.close()


def _post_id_of(value: bytes) -> object:
    try:
        obj = json.loads(value)
    except ValueError:
        return None
    return obj.get("post_id") if isinstance(obj, dict) else None
