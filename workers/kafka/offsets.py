"""Per-partition offset bookkeeping for out-of-order completion.

Records of one partition enter in offset order but complete in any order (a short post returns from the
engine before a long one; a cache hit before both). The offset that may be committed is the
**watermark**: the first offset that is not complete yet, or the last entered offset + 1 when every one
is. Nothing at or above an incomplete offset is ever committed, so a crash re-delivers exactly the
records whose outputs might not be on the broker (and possibly some completed ones above them: those
duplicates are identical decisions).

"Complete" means every output of the record was acknowledged by the broker (at-least-once) or produced
inside the open transaction (exactly-once). Same idea as Parallel Consumer's ``PartitionState`` and
faust's consumer ``ack``/``_new_offset``.

Each assignment of a partition gets a new **epoch**; completions carry the epoch they were admitted
under, and a completion from an earlier assignment (the partition was revoked while the request was in
the engine) is ignored — its record belongs to whoever owns the partition now.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

TP = tuple[str, int]


class OffsetTracker:
    """One partition, one assignment epoch."""

    __slots__ = ("_committed", "_done", "_entered", "_last", "epoch")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self._entered: deque[int] = deque()  # incomplete-or-not-yet-swept offsets, increasing
        self._done: set[int] = set()  # completed offsets still in ``_entered``
        self._last: int | None = None  # highest offset entered
        self._committed: int | None = None  # the last watermark handed to a successful commit

    def add(self, offset: int) -> None:
        if self._last is not None and offset <= self._last:
            raise ValueError(
                f"offset {offset} entered after {self._last}: a partition's records enter in order"
            )
        self._entered.append(offset)
        self._last = offset

    def complete(self, offset: int) -> None:
        q = self._entered
        if offset in self._done or not q or offset < q[0] or offset > q[-1]:
            raise ValueError(f"offset {offset} completed twice or never entered")
        self._done.add(offset)
        # sweep the contiguous completed prefix (amortised O(1) per offset)
        while q and q[0] in self._done:
            self._done.discard(q.popleft())

    @property
    def incomplete(self) -> int:
        return len(self._entered) - len(self._done)

    def first_incomplete(self) -> int | None:
        return self._entered[0] if self._entered else None

    def commit_point(self) -> int | None:
        """The offset to commit (next to read), or None when nothing was ever entered."""
        if self._entered:
            return self._entered[0]
        return None if self._last is None else self._last + 1

    def pending_commit(self) -> int | None:
        """``commit_point()`` if it moved since the last ``committed()``; else None."""
        cp = self.commit_point()
        return cp if cp is not None and cp != self._committed else None

    def committed(self, offset: int) -> None:
        self._committed = offset

    def all_complete(self) -> bool:
        return not self._entered


class Offsets:
    """The trackers of every owned partition, fenced by assignment epoch."""

    def __init__(self) -> None:
        self._epoch = 0
        self.parts: dict[TP, OffsetTracker] = {}

    def assign(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._epoch += 1
            self.parts[tp] = OffsetTracker(self._epoch)

    def revoke(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self.parts.pop(tp, None)

    def epoch(self, tp: TP) -> int | None:
        t = self.parts.get(tp)
        return None if t is None else t.epoch

    def add(self, tp: TP, offset: int) -> int | None:
        """Enter a record; returns the epoch to complete it under (None: partition not owned)."""
        t = self.parts.get(tp)
        if t is None:
            return None
        t.add(offset)
        return t.epoch

    def complete(self, tp: TP, epoch: int, offset: int) -> bool:
        """Mark done; False (ignored) when the partition was revoked or reassigned since it entered."""
        t = self.parts.get(tp)
        if t is None or t.epoch != epoch:
            return False
        t.complete(offset)
        return True

    def current(self, tp: TP, epoch: int) -> bool:
        t = self.parts.get(tp)
        return t is not None and t.epoch == epoch

    def pending_commits(self, only: Iterable[TP] | None = None) -> dict[TP, int]:
        keys = self.parts.keys() if only is None else [tp for tp in only if tp in self.parts]
        out: dict[TP, int] = {}
        for tp in keys:
            cp = self.parts[tp].pending_commit()
            if cp is not None:
                out[tp] = cp
        return out

    def mark_committed(self, offsets: dict[TP, int]) -> None:
        for tp, off in offsets.items():
            t = self.parts.get(tp)
            if t is not None:
                t.committed(off)

    def incomplete(self) -> int:
        return sum(t.incomplete for t in self.parts.values())

    def all_complete(self) -> bool:
        return all(t.all_complete() for t in self.parts.values())
