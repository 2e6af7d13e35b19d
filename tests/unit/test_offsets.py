"""OffsetTracker: the committed offset never passes an incomplete record, and reaches the end."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.kafka.offsets import Offsets, OffsetTracker

TP = ("posts", 0)


def test_watermark_waits_for_the_first_incomplete_offset() -> None:
    t = OffsetTracker(epoch=1)
    assert t.commit_point() is None
    for off in (10, 11, 13, 14):  # a gap (13 after 11: a transaction marker, compaction)
        t.add(off)
    t.complete(13)
    t.complete(14)
    assert t.commit_point() == 10
    t.complete(11)
    assert t.commit_point() == 10
    t.complete(10)
    assert t.commit_point() == 15 and t.all_complete()
    assert t.pending_commit() == 15
    t.committed(15)
    assert t.pending_commit() is None


def test_records_enter_in_order_and_complete_once() -> None:
    t = OffsetTracker(epoch=1)
    t.add(5)
    with pytest.raises(ValueError):
        t.add(5)
    t.complete(5)
    with pytest.raises(ValueError):
        t.complete(5)


def test_a_revoked_epoch_is_fenced() -> None:
    o = Offsets()
    o.assign([TP])
    e1 = o.add(TP, 0)
    assert e1 is not None
    o.revoke([TP])
    assert o.complete(TP, e1, 0) is False  # a completion after the revoke is not ours
    o.assign([TP])
    e2 = o.add(TP, 0)
    assert e2 is not None and e2 != e1
    assert o.complete(TP, e1, 0) is False  # nor after a reassignment
    assert o.parts[TP].commit_point() == 0
    assert o.complete(TP, e2, 0) is True
    assert o.pending_commits() == {TP: 1}


# one step: ("enter",), ("complete", index among incomplete), ("revoke",)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("enter"), st.integers(1, 3)),
        st.tuples(st.just("complete"), st.integers(0, 1000)),
        st.tuples(st.just("commit"), st.just(0)),
        st.tuples(st.just("revoke"), st.just(0)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(steps=steps, end=st.integers(1, 60))
def test_committed_offset_never_passes_an_incomplete_record(steps: list[tuple[str, int]], end: int) -> None:
    """A model of one partition's life: records are consumed from the committed offset in order (with
    gaps), complete in any order, commits happen at any time, and revokes throw away the assignment
    (anything in flight is re-delivered from the committed offset to the next assignment). Invariants:
    the committed offset is always <= the first incomplete offset of the current assignment, never goes
    backwards past a completed record, and once everything is entered and completed it is the end."""
    o = Offsets()
    o.assign([TP])
    committed = 0  # what the broker holds for the group
    position = 0  # next offset the consumer reads
    in_flight: list[tuple[int, int]] = []  # (epoch, offset), completion order chosen by the steps
    done_ever: set[int] = set()  # offsets whose outputs were published at some point

    def check() -> None:
        t = o.parts[TP]
        first = t.first_incomplete()
        cp = t.commit_point()
        if first is not None:
            assert cp is not None and cp <= first
        assert committed <= (first if first is not None else position)
        # everything below the committed offset was published
        assert all(off in done_ever for off in range(committed) if off % 7 != 3)

    for kind, arg in steps:
        if kind == "enter" and position < end:
            for _ in range(arg):
                if position >= end:
                    break
                if position % 7 == 3:  # a gap in the log (never delivered)
                    position += 1
                    continue
                epoch = o.add(TP, position)
                assert epoch is not None
                in_flight.append((epoch, position))
                position += 1
        elif kind == "complete" and in_flight:
            epoch, off = in_flight.pop(arg % len(in_flight))
            if o.complete(TP, epoch, off):
                done_ever.add(off)
        elif kind == "commit":
            pending = o.pending_commits()
            if TP in pending:
                assert pending[TP] >= committed
                committed = pending[TP]
                o.mark_committed(pending)
        elif kind == "revoke":
            o.revoke([TP])
            o.assign([TP])
            position = committed  # the next assignment re-reads from the committed offset
        check()

    # finish: the current assignment enters the rest and completes everything; stale ones are ignored
    while position < end:
        if position % 7 != 3:
            epoch = o.add(TP, position)
            assert epoch is not None
            in_flight.append((epoch, position))
        position += 1
    for epoch, off in reversed(in_flight):
        if o.complete(TP, epoch, off):
            done_ever.add(off)
    pending = o.pending_commits()
    committed = pending.get(TP, committed)
    check()
    last = max((p for p in range(end) if p % 7 != 3), default=-1)
    if last >= 0:
        assert committed == last + 1
