"""The core reports to an injected ``Sensor``: one batch is one ``on_cache`` and one ``on_outcomes`` event
(``RecordingSensor``), and ``PrometheusSensor`` turns those events into the series the dashboard and the
alert rules read (same names, labels and counts as when the core updated the metrics itself)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from typing import cast

import pytest
from prometheus_client import REGISTRY

from guard.errors import EngineRequestError
from guard.types import ModerationItem, Verdict
from schemas.events import ErrorCode
from schemas.wire import CachedVerdict
from workers.cache import VerdictCache
from workers.demo.sample_feed import post
from workers.observability.sensors import PrometheusSensor, RecordingSensor, Sensor
from workers.pipeline.engine_loop import EngineLoop
from workers.pipeline.moderator import Moderator
from workers.pipeline.records import Record
from workers.settings import Settings


class NovelEngine:
    """Batch engine: a post whose text says "novel" is unsafe with a novel risk, the rest are safe."""

    model_version = "1"
    policy_version = "p1"

    def __init__(self, name: str = "sensor-test") -> None:
        self.name = name
        self.calls: list[int] = []

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        self.calls.append(len(batch))
        novel = Verdict(safe=False, novel_risk="blackout challenge")
        return [novel if "novel" in (it.text or "") else Verdict(True) for it in batch]

    def close(self) -> None:
        pass


class DictCache:
    """The verdict cache's two calls, on a dict (no Redis in unit tests)."""

    def __init__(self) -> None:
        self.store: dict[str, CachedVerdict] = {}

    def get_many(self, keys: Sequence[str]) -> list[CachedVerdict | None]:
        return [self.store.get(k) for k in keys]

    def put_many(self, entries: Sequence[tuple[str, CachedVerdict]]) -> None:
        self.store.update(entries)

    def close(self) -> None:
        pass


def _records(values: list[bytes]) -> list[Record]:
    return [Record("posts", 0, i, None, v) for i, v in enumerate(values)]


def _moderator(engine: NovelEngine, cache: DictCache, sensor: Sensor | None) -> Moderator:
    return Moderator(Settings(), engine, None, cast(VerdictCache, cache), sensor=sensor)


# two posts the cache knows, a new safe one, a new one with a novel risk, and one that is not JSON
WARM = [post("w1", "a", "good morning"), post("w2", "a", "nice weather")]
BATCH = [
    post("h1", "b", "good morning"),  # same content as w1: a cache hit
    post("h2", "b", "nice weather"),
    post("m1", "b", "lunch was great"),
    post("m2", "b", "try the novel game everyone plays"),
    b"not json",
]


def _warm_cache(engine_name: str) -> DictCache:
    cache = DictCache()
    _moderator(NovelEngine(engine_name), cache, RecordingSensor()).process(_records(WARM))
    assert len(cache.store) == 2
    return cache


def test_a_moderated_batch_is_reported_as_batch_events() -> None:
    cache = _warm_cache("sensor-test")
    sensor = RecordingSensor()
    engine = NovelEngine()
    outcomes = _moderator(engine, cache, sensor).process(_records(BATCH))
    assert [o.kind.value for o in outcomes] == ["verdict"] * 4 + ["dead_letter"]

    assert sensor.engines == ["sensor-test"]
    assert sensor.consumed == 5
    assert (sensor.cache_hits, sensor.cache_misses) == (2, 2)
    assert sensor.outcome_batches == 1  # one event for the whole batch, not one per post
    assert sensor.verdicts == {("sensor-test", True): 3, ("sensor-test", False): 1}
    assert sensor.dead_letters == {ErrorCode.INVALID_JSON: 1}
    assert sensor.novel_risks == 1
    assert len(sensor.e2e_latencies_s) == 4 and all(a >= 0 for a in sensor.e2e_latencies_s)
    assert engine.calls == [2] and [size for size, _s in sensor.engine_batches] == [2]
    assert sensor.engine_failures == 0 and sensor.engine_requests_s == []


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


SERIES: list[tuple[str, dict[str, str]]] = [
    ("guardstream_consumed_total", {}),
    ("guardstream_cache_hits_total", {}),
    ("guardstream_cache_misses_total", {}),
    ("guardstream_moderated_total", {"engine": "sensor-prom", "outcome": "safe"}),
    ("guardstream_moderated_total", {"engine": "sensor-prom", "outcome": "unsafe"}),
    ("guardstream_moderated_total", {"engine": "sensor-prom", "outcome": "abstain"}),
    ("guardstream_dead_letters_total", {"error_code": "invalid_json"}),
    ("guardstream_novel_risks_total", {}),
    ("guardstream_e2e_latency_seconds_count", {}),
    ("guardstream_engine_latency_seconds_count", {}),
    ("guardstream_engine_batch_size_count", {}),
    ("guardstream_engine_batch_size_sum", {}),
]


def test_the_prometheus_sensor_writes_the_series_the_dashboard_reads() -> None:
    cache = _warm_cache("sensor-prom")
    before = [_sample(n, **lb) for n, lb in SERIES]
    m = _moderator(NovelEngine("sensor-prom"), cache, None)  # no sensor: the process-wide Prometheus one
    assert isinstance(m.sensor, PrometheusSensor)
    # the engine's verdict series exist from the start, at 0 (as when the moderator made the children)
    assert REGISTRY.get_sample_value(
        "guardstream_moderated_total", {"engine": "sensor-prom", "outcome": "abstain"}
    ) == pytest.approx(0.0)
    m.process(_records(BATCH))
    delta = [_sample(n, **lb) - b for (n, lb), b in zip(SERIES, before, strict=True)]
    assert delta == [5, 2, 2, 3, 1, 0, 1, 1, 4, 1, 1, 2]


def test_the_sensors_implement_the_protocol() -> None:
    """mypy checks ``PrometheusSensor`` (the default); this checks both, test double included."""
    wanted = {n: inspect.signature(f) for n, f in vars(Sensor).items() if n.startswith("on_")}
    assert len(wanted) >= 15
    for impl in (PrometheusSensor, RecordingSensor):
        have = {n: inspect.signature(getattr(impl, n)) for n in wanted if hasattr(impl, n)}
        assert have == wanted, impl.__name__


class FlakyStreamingEngine:
    """Times out on the first request, fails the second, answers the rest."""

    name = "flaky"
    model_version = "1"
    policy_version = "p1"
    max_in_flight = 4

    def __init__(self) -> None:
        self.calls = 0

    async def judge(self, item: ModerationItem) -> Verdict:
        self.calls += 1
        if self.calls == 1:
            await asyncio.sleep(5)
        if self.calls == 2:
            raise EngineRequestError("HTTP 400")
        return Verdict(True)

    async def aclose(self) -> None:
        pass


def test_the_engine_loop_reports_requests_failures_and_timeouts() -> None:
    sensor = RecordingSensor()
    settings = Settings().model_copy(update={"engine_timeout_s": 0.05, "engine_retries": 1})
    loop = EngineLoop(FlakyStreamingEngine(), settings, sensor=sensor)
    try:
        v = loop.submit(loop.judge(ModerationItem("p1", "hello"))).result(timeout=10)
    finally:
        loop.close(1.0)
    assert isinstance(v, Verdict) and v.safe is True
    assert (sensor.engine_timeouts, sensor.engine_failures, len(sensor.engine_requests_s)) == (1, 1, 1)
