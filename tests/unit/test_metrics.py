"""``observe_many`` writes the same histogram as one ``observe`` per value."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from workers.observability.metrics import E2E_LATENCY, observe_many

BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
values = st.lists(
    st.sampled_from(BOUNDS)  # exactly on a bound: it belongs to that bucket (le)
    | st.floats(min_value=-10, max_value=10)
    | st.sampled_from([float("inf"), float("-inf"), 0.0]),
    max_size=60,
)


def _pair() -> tuple[CollectorRegistry, Histogram, CollectorRegistry, Histogram]:
    ra, rb = CollectorRegistry(), CollectorRegistry()
    return (
        ra,
        Histogram("h", "h", buckets=BOUNDS, registry=ra),
        rb,
        Histogram("h", "h", buckets=BOUNDS, registry=rb),
    )


def _exposition(registry: CollectorRegistry) -> tuple[list[str], float]:
    """The bucket and count lines, and the sum (compared as a number: adding in another order may
    differ in the last bit)."""
    lines = [ln for ln in generate_latest(registry).decode().splitlines() if "_created" not in ln]
    (total,) = (float(ln.split()[1]) for ln in lines if ln.startswith("h_sum "))
    return [ln for ln in lines if not ln.startswith("h_sum ")], total


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(values, max_size=4))
def test_observe_many_matches_observe(batches: list[list[float]]) -> None:
    ra, one_by_one, rb, bulk = _pair()
    for batch in batches:
        for v in batch:
            one_by_one.observe(v)
        observe_many(bulk, batch)
    (lines_a, sum_a), (lines_b, sum_b) = _exposition(ra), _exposition(rb)
    assert lines_a == lines_b
    assert sum_a == pytest.approx(sum_b, nan_ok=True, abs=1e-9)


def test_observe_many_on_the_worker_histogram() -> None:
    before = E2E_LATENCY._sum.get()  # type: ignore[attr-defined]
    observe_many(E2E_LATENCY, [0.2, 4.0])
    assert E2E_LATENCY._sum.get() - before == pytest.approx(4.2)  # type: ignore[attr-defined]
