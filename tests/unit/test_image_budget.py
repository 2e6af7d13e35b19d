"""ImageBudget (``GUARDSTREAM_INFLIGHT_IMAGE_BYTES``): the accounting of normalised images from decode to
outcome, driven the way the worker drives it (FIFO admission of decoded posts, reserve the worst case,
settle to the decoded bytes with identical refs shared inside a fetch batch, release on outcome, revoke
or shutdown) under random completion orders. It never goes negative, is exact at every step (the bytes
of the distinct images live leases hold), stays within the capacity except for one lone oversized post,
a blocked admission always resumes, and it returns to 0."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from schemas.events import ImageRef
from workers.media import ImageBudget, ImageLease, image_nbytes

PER_IMAGE = 16 * 16 * 4  # the largest image the "decoder" below returns
POOL = [ImageRef(bucket="b", key=f"k{i}") for i in range(6)]


def _img(side: int) -> Image.Image:
    return Image.new("RGB", (side, side))


@dataclass
class Sim:
    """The worker's use of the budget, without Kafka (``workers.kafka.window``: ``Window._route`` and
    ``Window.admit_waiting``)."""

    budget: ImageBudget
    sizes: dict[ImageRef, int]
    held: list[tuple[int, list[ImageRef], bool]] = field(default_factory=list)  # id, refs, fails
    live: dict[int, ImageLease] = field(default_factory=dict)
    images_of: dict[int, list[Image.Image]] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)

    def admit(self, posts: list[tuple[int, list[ImageRef], bool]]) -> None:
        go: list[tuple[int, list[ImageRef], bool]] = []
        reserved = 0
        for pid, refs, fails in posts:
            need = self.budget.worst_case(refs)
            if self.held or not self.budget.try_reserve(need):
                self.held.append((pid, refs, fails))
                continue
            reserved += need
            go.append((pid, refs, fails))
        if not go:
            return
        decoded: dict[ImageRef, Image.Image] = {}  # fetch_posts: identical refs decoded once per batch
        per_post: list[list[Image.Image]] = []
        for _pid, refs, fails in go:
            imgs = [decoded.setdefault(r, _img(self.sizes[r])) for r in refs]
            per_post.append([] if fails else imgs)  # a post with a bad image holds none
        leases = self.budget.settle(reserved, per_post)
        for (pid, _refs, _fails), lease, imgs in zip(go, leases, per_post, strict=True):
            if lease is None:
                self.finished.add(pid)  # a dead letter: published at once
                continue
            self.live[pid] = lease
            self.images_of[pid] = imgs

    def retry_held(self) -> None:
        if self.held and self.budget.fits(self.budget.worst_case(self.held[0][1])):
            held, self.held = self.held, []
            self.admit(held)

    def release(self, pid: int) -> None:
        self.live.pop(pid).release()
        self.images_of.pop(pid)
        self.finished.add(pid)

    def check(self) -> None:
        b = self.budget
        assert b.used >= 0
        distinct = {id(i): i for imgs in self.images_of.values() for i in imgs}
        assert b.used == sum(image_nbytes(i) for i in distinct.values()), "accounting is not exact"
        assert b.used <= b.capacity or len(self.live) == 1, "over the budget with more than one post"


posts_st = st.lists(
    st.tuples(st.lists(st.sampled_from(POOL), min_size=1, max_size=4), st.booleans()),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(
    capacity=st.integers(PER_IMAGE, 12 * PER_IMAGE),
    sides=st.lists(st.integers(1, 16), min_size=len(POOL), max_size=len(POOL)),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("batch"), posts_st),
            st.tuples(st.just("complete"), st.integers(0, 1000)),
            st.tuples(st.just("revoke"), st.integers(0, 1000)),
        ),
        max_size=40,
    ),
)
def test_random_admissions_completions_and_revokes(
    capacity: int, sides: list[int], ops: list[tuple[str, object]]
) -> None:
    sim = Sim(ImageBudget(capacity, PER_IMAGE), dict(zip(POOL, sides, strict=True)))
    next_id = 0
    total = 0
    for kind, arg in ops:
        if kind == "batch":
            assert isinstance(arg, list)
            batch = [(next_id + i, refs, fails) for i, (refs, fails) in enumerate(arg)]
            next_id += len(batch)
            total += len(batch)
            sim.admit(batch)
        elif sim.live:
            assert isinstance(arg, int)
            pids = sorted(sim.live)
            if kind == "complete":  # one request finishes, in any order
                sim.release(pids[arg % len(pids)])
            else:  # a revoke drops every second in-flight post; a late completion releases again
                for pid in pids[arg % 2 :: 2]:
                    lease = sim.live[pid]
                    sim.release(pid)
                    lease.release()  # exactly once: a second release gives nothing back
        sim.retry_held()
        sim.check()
    # drain: a blocked admission resumes as releases make room, until every post is through
    rounds = 0
    while sim.live or sim.held:
        rounds += 1
        assert rounds <= total + 1, "admission never resumed"
        for pid in sorted(sim.live):
            sim.release(pid)
            sim.check()
        assert sim.budget.used == 0
        sim.retry_held()
        sim.check()
    assert len(sim.finished) == total
    assert sim.budget.used == 0


def test_a_post_larger_than_the_budget_is_admitted_alone() -> None:
    b = ImageBudget(capacity=3 * PER_IMAGE, per_image_bytes=PER_IMAGE)
    big = b.worst_case(POOL[:4])
    assert big > b.capacity
    assert b.try_reserve(big), "an empty budget must take a lone oversized post (no deadlock)"
    assert not b.try_reserve(PER_IMAGE), "nothing joins a lone oversized post"
    (lease,) = b.settle(big, [[_img(16), _img(16), _img(16), _img(16)]])
    assert lease is not None and b.used == 4 * PER_IMAGE > b.capacity
    assert not b.fits(PER_IMAGE)
    lease.release()
    assert b.used == 0 and b.fits(PER_IMAGE)


def test_identical_refs_in_a_batch_are_counted_once_and_freed_with_the_last_holder() -> None:
    b = ImageBudget(capacity=64 * PER_IMAGE, per_image_bytes=PER_IMAGE)
    shared = _img(16)
    reserved = 3 * b.worst_case([POOL[0], POOL[0]])  # three posts × 2 refs to one object
    assert reserved == 3 * PER_IMAGE  # distinct refs per post: 1
    assert b.try_reserve(reserved)
    leases = b.settle(reserved, [[shared, shared], [shared], [shared]])
    assert b.used == PER_IMAGE
    for lease in leases[:2]:
        assert lease is not None
        lease.release()
        lease.release()
        assert b.used == PER_IMAGE, "freed while a post still holds the image"
    assert leases[2] is not None
    leases[2].release()
    assert b.used == 0


def test_settle_gives_back_what_was_not_decoded() -> None:
    b = ImageBudget(capacity=64 * PER_IMAGE, per_image_bytes=PER_IMAGE)
    assert b.try_reserve(4 * PER_IMAGE)
    assert b.settle(4 * PER_IMAGE, [[], []]) == [None, None]  # failed fetches, dead letters
    assert b.used == 0
    assert b.try_reserve(PER_IMAGE)
    (lease,) = b.settle(PER_IMAGE, [[_img(2)]])  # a 2×2 image costs 16 B, not the worst case
    assert b.used == 16 and lease is not None
    lease.release()
    assert b.used == 0 and b.peak == 4 * PER_IMAGE


def test_the_worst_case_is_the_largest_image_the_decoder_returns() -> None:
    from workers.media import decode_image

    target = 200_000
    b = ImageBudget.for_target(1 << 30, target)
    buf = io.BytesIO()
    Image.new("RGB", (1600, 900), (10, 200, 30)).save(buf, format="PNG")
    img = decode_image(buf.getvalue(), 40_000_000, target_pixels=target)
    assert image_nbytes(img) <= b.per_image_bytes == target * 4
