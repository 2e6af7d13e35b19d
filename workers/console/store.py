"""The review queue in Redis: items, filters, claims with expiring leases, labels, alerted clusters.

Why Redis: it is already in the stack (the verdict cache), ``SET NX PX`` is exactly a claim with a lease
that expires on its own, and every console replica sees the same queue. The store is a *materialised
view*: the topics are the source of truth and the ingester rebuilds it from them (labels included, from
the reviews topic), so losing the Redis loses no decision, only the time to re-read the topics.

Keys (all under the configured prefix): ``item:<post_id>`` (JSON), ``open:new`` / ``open:urgent``
(sorted sets of open items), ``labelled`` (sorted set), ``claim:<post_id>`` (reviewer, with a TTL),
``lock:<post_id>`` (one label submission at a time), ``skip:<reviewer>``, ``pending:<post_id>``
(alerted-cluster membership that arrived before the post's verdict), ``alerts`` (hash cluster → latest
alert JSON).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel, Field

from schemas.events import AlertEvent, ReviewEvent


class Reason(StrEnum):
    """Why a post needs a human, most urgent first in ``URGENCY``."""

    ALERTED_CLUSTER = "alerted_cluster"
    NOVEL_RISK = "novel_risk"
    UNCERTAIN = "uncertain"
    DEAD_LETTER = "dead_letter"
    ABSTAINED = "abstained"


URGENCY = {
    Reason.ALERTED_CLUSTER: 5,
    Reason.NOVEL_RISK: 4,
    Reason.UNCERTAIN: 3,
    Reason.DEAD_LETTER: 2,
    Reason.ABSTAINED: 1,
}


class Label(BaseModel):
    unsafe: bool
    category: str | None = None
    novel_risk: str | None = None
    reviewer_id: str
    reviewed_at: datetime

    @classmethod
    def of(cls, ev: ReviewEvent) -> Label:
        return cls(
            unsafe=ev.unsafe,
            category=ev.category,
            novel_risk=ev.novel_risk,
            reviewer_id=ev.reviewer_id,
            reviewed_at=ev.reviewed_at,
        )

    def same_decision(self, ev: ReviewEvent) -> bool:
        return (self.unsafe, self.category, self.novel_risk) == (ev.unsafe, ev.category, ev.novel_risk)

    def describe(self) -> str:
        if not self.unsafe:
            return "safe"
        return (
            "unsafe"
            + (f" {self.category}" if self.category else "")
            + (f" ({self.novel_risk})" if self.novel_risk else "")
        )


class QueueItem(BaseModel):
    """One post waiting for (or given) a human label, with what the model said about it."""

    post_id: str
    author_id: str | None = None
    modality: str
    text: str | None = None
    images: list[str] = Field(default_factory=list)
    created_at: datetime | None = None
    reasons: list[Reason] = Field(default_factory=list)
    clusters: list[str] = Field(default_factory=list)
    # the model's decision (None fields when it was a dead letter)
    safe: bool | None = None
    category: str | None = None  # most specific taxonomy id the model gave
    category_name: str | None = None
    p_unsafe: float | None = None
    novel_risk: str | None = None
    abstained_reason: str | None = None
    reasoning: str | None = None
    raw_output: str | None = None
    dead_letter_code: str | None = None
    dead_letter_message: str | None = None
    engine: str | None = None
    model_version: str | None = None
    policy_version: str | None = None
    decided_at: datetime
    label: Label | None = None

    @property
    def is_open(self) -> bool:
        return self.label is None

    def urgency(self) -> int:
        return max((URGENCY[r] for r in self.reasons), default=0)

    def merge(self, newer: QueueItem) -> QueueItem:
        """Reasons and clusters accumulate; the decision is the latest one; a label is never lost."""
        base, other = (self, newer) if newer.decided_at >= self.decided_at else (newer, self)
        merged = other.model_copy(
            update={
                "reasons": sorted(set(self.reasons) | set(newer.reasons), key=lambda r: -URGENCY[r]),
                "clusters": sorted(set(self.clusters) | set(newer.clusters)),
                "label": self.label or newer.label,
                "text": other.text if other.text is not None else base.text,
                "images": other.images or base.images,
                "author_id": other.author_id or base.author_id,
                "created_at": other.created_at or base.created_at,
            }
        )
        return merged


@dataclass(frozen=True)
class Filters:
    reason: str | None = None
    modality: str | None = None
    category: str | None = None  # matches the id or its parent category (C9 matches C9S1)
    cluster: str | None = None

    def match(self, it: QueueItem) -> bool:
        if self.reason and self.reason not in it.reasons:
            return False
        if self.modality and it.modality != self.modality:
            return False
        if self.category and not (it.category or "").upper().startswith(self.category.upper()):
            return False
        return not (self.cluster and self.cluster not in it.clusters)

    def query(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}


@dataclass(frozen=True)
class Claim:
    ok: bool
    holder: str | None
    expires_in_s: float


class StoreBusy(RuntimeError):
    """Another submission for the same post is in progress."""


# Take the claim when it is free or already ours (then renew the lease); else report the holder.
_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, ARGV[1], tonumber(ARGV[2])}
end
return {0, cur, redis.call('PTTL', KEYS[1])}
"""
# Release only our own claim (a lease that expired and was taken by someone else is theirs now).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class QueueStore:
    def __init__(self, url: str, prefix: str, lease_s: int) -> None:
        self.r: redis.Redis = redis.Redis.from_url(url, decode_responses=True)
        self.p = prefix
        self.lease_ms = lease_s * 1000
        self._claim = self.r.register_script(_CLAIM)
        self._release = self.r.register_script(_RELEASE)

    # ------------------------------------------------------------------ keys
    @staticmethod
    def item_key(prefix: str, post_id: str) -> str:
        return f"{prefix}item:{post_id}"

    def _item(self, post_id: str) -> str:
        return self.item_key(self.p, post_id)

    def _claim_key(self, post_id: str) -> str:
        return f"{self.p}claim:{post_id}"

    # ------------------------------------------------------------------ items
    def get(self, post_id: str) -> QueueItem | None:
        raw = self.r.get(self._item(post_id))
        return QueueItem.model_validate_json(raw) if raw else None

    def _update(self, post_id: str, fn: Callable[[QueueItem | None], QueueItem | None]) -> QueueItem | None:
        """Read-modify-write one item atomically (optimistic: WATCH, retried on conflict)."""
        key = self._item(post_id)
        result: list[QueueItem | None] = [None]

        def tx(pipe: Any) -> None:
            raw = pipe.get(key)
            cur = QueueItem.model_validate_json(raw) if raw else None
            new = fn(cur)
            result[0] = new
            if new is None:
                pipe.multi()
                return
            pipe.multi()
            pipe.set(key, new.model_dump_json())
            ts = new.decided_at.timestamp() * 1000
            # per-reason indexes: reasons only accumulate on an open item, and all go when it is labelled
            if new.is_open:
                pipe.zadd(f"{self.p}open:new", {post_id: ts})
                pipe.zadd(f"{self.p}open:urgent", {post_id: new.urgency() * 1e13 + ts})
                for r in new.reasons:
                    pipe.zadd(f"{self.p}open:reason:{r.value}", {post_id: ts})
                pipe.zrem(f"{self.p}labelled", post_id)
            else:
                assert new.label is not None
                pipe.zrem(f"{self.p}open:new", post_id)
                pipe.zrem(f"{self.p}open:urgent", post_id)
                for r in Reason:
                    pipe.zrem(f"{self.p}open:reason:{r.value}", post_id)
                pipe.zadd(f"{self.p}labelled", {post_id: new.label.reviewed_at.timestamp() * 1000})

        self.r.transaction(tx, key)
        return result[0]

    def upsert(self, item: QueueItem) -> QueueItem:
        pending = self.r.smembers(f"{self.p}pending:{item.post_id}")
        if pending:
            item = item.model_copy(
                update={
                    "clusters": sorted(set(item.clusters) | set(pending)),
                    "reasons": sorted({*item.reasons, Reason.ALERTED_CLUSTER}, key=lambda r: -URGENCY[r]),
                }
            )
        out = self._update(item.post_id, lambda cur: item if cur is None else cur.merge(item))
        assert out is not None
        if pending:
            self.r.delete(f"{self.p}pending:{item.post_id}")
        return out

    def pending(self, post_id: str) -> bool:
        return bool(self.r.exists(f"{self.p}pending:{post_id}"))

    def add_cluster_members(self, cluster_id: str, post_ids: list[str]) -> int:
        """Mark posts as members of an alerted cluster; posts not seen yet get it when they arrive."""
        found = 0
        for pid in post_ids:

            def mark(cur: QueueItem | None) -> QueueItem | None:
                if cur is None:
                    return None
                return cur.model_copy(
                    update={
                        "clusters": sorted({*cur.clusters, cluster_id}),
                        "reasons": sorted({*cur.reasons, Reason.ALERTED_CLUSTER}, key=lambda r: -URGENCY[r]),
                    }
                )

            if self._update(pid, mark) is not None:
                found += 1
            else:
                key = f"{self.p}pending:{pid}"
                self.r.sadd(key, cluster_id)
                self.r.expire(key, 7 * 24 * 3600)
        return found

    def mark_labelled(self, ev: ReviewEvent) -> QueueItem | None:
        """Record a label (from this console or from the reviews topic). Unknown posts are ignored;
        the latest label wins, as in the training export."""

        def apply(cur: QueueItem | None) -> QueueItem | None:
            if cur is None:
                return None
            if cur.label is not None and cur.label.reviewed_at > ev.reviewed_at:
                return cur
            return cur.model_copy(update={"label": Label.of(ev)})

        return self._update(ev.post_id, apply)

    # ------------------------------------------------------------------ listing
    def iter_open(
        self, *, urgent: bool = False, chunk: int = 200, reason: str | None = None
    ) -> Iterator[QueueItem]:
        if reason and not urgent:
            key = f"{self.p}open:reason:{reason}"
        else:
            key = f"{self.p}open:{'urgent' if urgent else 'new'}"
        start = 0
        while True:
            ids = self.r.zrevrange(key, start, start + chunk - 1)
            if not ids:
                return
            for raw in self.r.mget([self._item(str(i)) for i in ids]):
                if raw:
                    it = QueueItem.model_validate_json(raw)
                    if it.is_open:
                        yield it
            start += chunk

    def page(
        self, filters: Filters, *, urgent: bool = False, limit: int = 50, offset: int = 0
    ) -> tuple[list[QueueItem], int]:
        """One page of open items matching ``filters`` and how many match in all."""
        out: list[QueueItem] = []
        total = 0
        for it in self.iter_open(urgent=urgent, reason=filters.reason):
            if filters.match(it):
                if offset <= total < offset + limit:
                    out.append(it)
                total += 1
        return out, total

    def labelled(self, limit: int = 50) -> list[QueueItem]:
        ids = self.r.zrevrange(f"{self.p}labelled", 0, limit - 1)
        raws = self.r.mget([self._item(str(i)) for i in ids]) if ids else []
        return [QueueItem.model_validate_json(r) for r in raws if r]

    def counts(self) -> dict[str, int]:
        """Open items per reason, plus totals (every page shows them: counted by Redis, not by a scan)."""
        pipe = self.r.pipeline(transaction=False)
        names = [r.value for r in Reason]
        for name in names:
            pipe.zcard(f"{self.p}open:reason:{name}")
        pipe.zcard(f"{self.p}open:new")
        pipe.zcard(f"{self.p}labelled")
        values = [int(v) for v in pipe.execute()]
        return {**dict(zip(names, values, strict=False)), "open": values[-2], "labelled": values[-1]}

    # ------------------------------------------------------------------ claims
    def claim(self, post_id: str, reviewer: str) -> Claim:
        ok, holder, ttl = self._claim(keys=[self._claim_key(post_id)], args=[reviewer, self.lease_ms])
        return Claim(bool(ok), holder, max(int(ttl), 0) / 1000)

    def holder(self, post_id: str) -> Claim:
        key = self._claim_key(post_id)
        pipe = self.r.pipeline()
        pipe.get(key)
        pipe.pttl(key)
        holder, ttl = pipe.execute()
        return Claim(False, holder, max(int(ttl), 0) / 1000)

    def release(self, post_id: str, reviewer: str) -> bool:
        return bool(self._release(keys=[self._claim_key(post_id)], args=[reviewer]))

    def skip(self, post_id: str, reviewer: str) -> None:
        """Put a post aside for this reviewer (for one lease period) and let others have it."""
        key = f"{self.p}skip:{reviewer}"
        self.r.sadd(key, post_id)
        self.r.pexpire(key, self.lease_ms)
        self.release(post_id, reviewer)

    def next_for(self, reviewer: str, filters: Filters, *, urgent: bool = True) -> QueueItem | None:
        """Claim and return the first open item this reviewer may take: not claimed by anyone else, not
        put aside by them. A claim they already hold comes first (a reload does not skip work)."""
        skipped = self.r.smembers(f"{self.p}skip:{reviewer}")
        for it in self.iter_open(urgent=urgent):
            if it.post_id in skipped or not filters.match(it):
                continue
            if self.claim(it.post_id, reviewer).ok:
                return it
        return None

    @contextmanager
    def submission(self, post_id: str) -> Iterator[None]:
        """One label submission per post at a time (a double click must not publish twice)."""
        key = f"{self.p}lock:{post_id}"
        token = f"{time.monotonic_ns()}"
        if not self.r.set(key, token, nx=True, px=30_000):
            raise StoreBusy(f"a label for {post_id} is being submitted")
        try:
            yield
        finally:
            self._release(keys=[key], args=[token])

    # ------------------------------------------------------------------ alerts
    def record_alert(self, alert: AlertEvent) -> None:
        key = f"{self.p}alerts"
        cur = self.r.hget(key, alert.cluster_id)
        if cur and AlertEvent.model_validate_json(cur).created_at > alert.created_at:
            return
        self.r.hset(key, alert.cluster_id, alert.model_dump_json())

    def alerts(self) -> dict[str, AlertEvent]:
        return {
            str(cid): AlertEvent.model_validate_json(v)
            for cid, v in self.r.hgetall(f"{self.p}alerts").items()
        }

    def clear(self) -> None:
        """Delete this store's keys (tests and ``console --rebuild``); only keys under our prefix."""
        for key in self.r.scan_iter(match=f"{self.p}*", count=500):
            self.r.delete(key)


def now() -> datetime:
    return datetime.now(UTC)
