"""Broker outages, broker restarts on durable storage, a slow engine and a rebalance during a slow batch,
all on the real broker (Tansu), S3 server (moto) and Redis. Counts are printed."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from guard.engines.cpu.engine import CpuEngine
from infra.stack import Broker, create_topics, ensure_bucket
from tests.conftest import Services
from tests.engines import GatedEngine
from workers.demo.sample_feed import post
from workers.kafka.topics import produce_all, read_records, read_topic
from workers.kafka.worker import BrokerUnavailable, KafkaWorker
from workers.pipeline.records import Outcome
from workers.settings import Settings
from workers.testing import OutcomeRecorder
from workers.wiring import build_worker

pytestmark = pytest.mark.integration


def feed(s: Settings, n: int, tag: str) -> set[str]:
    ids = [f"{tag}{i}" for i in range(n)]
    produce_all(
        s.bootstrap_servers,
        s.posts_topic,
        [
            # keyed: spread over the partitions by hash (null keys go "sticky", often all to one)
            (pid, post(pid, f"a{i % 7}", f"{tag} post {i} about a walk in the park"))
            for i, pid in enumerate(ids)
        ],
    )
    return set(ids)


def verdict_counts(s: Settings) -> Counter[str]:
    return Counter(json.loads(v)["post_id"] for v in read_topic(s.bootstrap_servers, s.verdicts_topic))


def own_broker_settings(settings: Settings, broker: Broker, **kw: Any) -> Settings:
    s = settings.model_copy(update={"bootstrap_servers": broker.bootstrap, **kw})
    create_topics(
        s.bootstrap_servers, {s.posts_topic: 3, s.verdicts_topic: 3, s.novel_risk_topic: 1, s.dlq_topic: 1}
    )
    return s


@pytest.fixture
def memory_broker(tmp_path: Path) -> Iterator[Broker]:
    from infra.stack import free_port

    b = Broker(port=free_port(), log_path=tmp_path / "tansu.log").start()
    yield b
    b.stop()


def test_broker_outage_past_the_deadline_exits_with_a_clear_error(
    kafka_settings: Settings, memory_broker: Broker, cpu_engine: CpuEngine
) -> None:
    s = own_broker_settings(kafka_settings, memory_broker, broker_deadline_s=3.0)
    ids = feed(s, 12, "down")
    killed_at: list[float] = []

    def on_batch(_outs: list[Outcome]) -> None:
        if worker.stats.consumed == len(ids) and not killed_at:  # everything published and committed
            memory_broker.stop(kill=True)
            killed_at.append(time.monotonic())

    worker = build_worker(s, cpu_engine, observers=[OutcomeRecorder(on_batch, keep=False)])
    with capture_logs() as logs, pytest.raises(BrokerUnavailable, match="deadline 3s"):
        worker.run(idle_timeout_s=60)
    waited = time.monotonic() - killed_at[0]
    events = [e["event"] for e in logs]
    print(f"broker-outage: posts={len(ids)} published={worker.stats.verdicts} gave up after {waited:.1f}s")
    assert worker.stats.verdicts == len(ids)
    assert 3.0 <= waited < 20.0
    assert "broker_unreachable_retrying" in events and "broker_unavailable_giving_up" in events


class Observer:
    """Records what the worker reports through its ``on_event`` seam (pauses, revokes, broker down)."""

    def __init__(self) -> None:
        self.paused_in_flight: list[int] = []
        self.revoking = threading.Event()
        self.broker_down = threading.Event()

    def __call__(self, name: str, details: dict[str, Any]) -> None:
        if name == "paused":
            self.paused_in_flight.append(details["in_engine"])
        elif name == "revoking":
            self.revoking.set()
        elif name == "broker_down":
            self.broker_down.set()


def test_broker_restart_mid_run_on_durable_storage_loses_nothing(
    kafka_settings: Settings, services: Services, cpu_engine: CpuEngine, tmp_path: Path
) -> None:
    """Tansu on s3:// storage (the moto server): kill -9 the broker while the worker is running, start
    it again on the same storage once the worker has noticed; the worker rides the outage out (it is
    shorter than the deadline) and every post ends with exactly one verdict."""
    from infra.stack import free_port

    bucket = f"tansu-{uuid.uuid4().hex[:8]}"
    ensure_bucket(services.s3_client(), bucket)
    env = {"AWS_ENDPOINT": services.s3.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    broker = Broker(port=free_port(), storage=f"s3://{bucket}/", log_path=tmp_path / "tansu.log", env=env)
    broker.start()
    try:
        # short commit intervals and a small window: on_batch (called per commit) sees the run a third
        # of the way through, with most of the feed still to do when the broker goes
        s = own_broker_settings(
            kafka_settings,
            broker,
            broker_deadline_s=60.0,
            cache_enabled=False,
            commit_interval_ms=200,
            max_in_flight=8,
        )
        ids = feed(s, 120, "durable")
        seen = Observer()
        halfway, restarted = threading.Event(), threading.Event()

        def restart() -> None:
            halfway.wait(120)
            broker.stop(kill=True)
            seen.broker_down.wait(60)
            broker.start()
            restarted.set()

        t = threading.Thread(target=restart, daemon=True)
        t.start()

        # post ids whose verdicts the broker acknowledged and whose offsets were committed before the
        # kill (on_batch runs after a commit, with what it covered)
        acked_before_kill: set[str] = set()

        def on_batch(outs: list[Outcome]) -> None:
            if not seen.broker_down.is_set():  # a commit after the kill cannot have succeeded
                acked_before_kill.update(o.post_id for o in outs if o.post_id)
            if worker.stats.consumed >= len(ids) // 3:
                halfway.set()

        worker = build_worker(s, cpu_engine, on_event=seen, observers=[OutcomeRecorder(on_batch, keep=False)])
        with capture_logs() as logs:
            worker.run(until_drained=True)
        t.join(60)
        events = [e["event"] for e in logs]
        assert restarted.is_set() and seen.broker_down.is_set(), "the outage was never noticed"
        assert "broker_reachable_again" in events and "broker_unavailable_giving_up" not in events
        # Whatever the first run left uncommitted (it may stop early: after a restart Tansu can report a
        # partition's end at its last batch's base offset), a second run finishes from the committed
        # offsets; a post committed without its verdict would stay missing.
        build_worker(s, cpu_engine).run(until_drained=True)
        counts = verdict_counts(s)
        lost = ids - set(counts)
        duplicated = sum(c - 1 for c in counts.values())
        # A verdict the broker acknowledged before the kill and no longer has was lost by the broker, not by
        # the worker: Tansu 0.1.2 on s3:// storage sometimes rewrites a partition's first batch objects
        # after a kill -9 restart (seen ~1 run in 4: offsets 0-3 of one verdicts partition, every one
        # acknowledged with no error). The worker's guarantee — nothing committed past an unacknowledged
        # output — is what this test holds it to; a broker that loses acknowledged data is reported.
        by_broker = lost & acked_before_kill
        by_worker = lost - acked_before_kill
        print(
            f"broker-restart[s3://]: posts={len(ids)} restarts=1 lost={len(lost)} "
            f"(after the broker's ack: {len(by_broker)}) duplicated={duplicated}"
        )
        assert not by_worker, sorted(by_worker)[:10]
        if by_broker:
            pytest.xfail(f"Tansu s3:// storage lost {len(by_broker)} acknowledged verdicts across a kill -9")
        assert set(counts) == ids
    finally:
        broker.stop()


def test_slow_engine_pauses_partitions_and_keeps_group_membership(
    kafka_settings: Settings, cpu_engine: CpuEngine
) -> None:
    """The first batch takes longer than max.poll.interval.ms: a worker that stopped polling would be
    thrown out of the group and fail its commit; this one pauses, keeps polling and commits."""
    s = kafka_settings.model_copy(
        update={"pause_after_s": 0.2, "kafka_extra": {"max.poll.interval.ms": "7000"}, "cache_enabled": False}
    )
    ids = feed(s, 40, "slow")
    engine = GatedEngine(cpu_engine, hold_s=9.0)  # never released: a 9 s batch
    seen = Observer()
    worker = build_worker(s, engine, on_event=seen)
    stats = worker.run(until_drained=True)
    counts = verdict_counts(s)
    print(f"slow-engine: posts={len(ids)} pauses={len(seen.paused_in_flight)} batches={stats.batches}")
    assert seen.paused_in_flight, "the worker never paused its partitions"
    # while paused: the window (one batch in the engine, one gathering) and nothing read beyond it
    assert max(seen.paused_in_flight) <= worker.max_in_flight == 2 * s.max_batch_size
    assert set(counts) == ids and max(counts.values()) == 1


def test_rebalance_during_a_slow_batch_publishes_it_once(
    kafka_settings: Settings, cpu_engine: CpuEngine
) -> None:
    s = kafka_settings.model_copy(update={"pause_after_s": 0.1, "cache_enabled": False})
    ids = feed(s, 60, "reb")
    per_partition = Counter(r.partition for r in read_records(s.bootstrap_servers, s.posts_topic))
    # every partition holds more than the one batch the first worker can have in flight: whichever
    # partitions move to the second worker, it has posts of its own to moderate
    assert len(per_partition) == 3 and min(per_partition.values()) > s.max_batch_size, per_partition
    gated = GatedEngine(cpu_engine)
    seen = Observer()
    first = build_worker(s, gated, on_event=seen)
    second = build_worker(s, cpu_engine)
    errors: list[BaseException] = []

    def run(w: KafkaWorker) -> None:
        try:
            w.run(until_drained=True)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t1 = threading.Thread(target=run, args=(first,))
    t1.start()
    assert gated.entered.wait(60), "the first batch never reached the engine"
    t2 = threading.Thread(target=run, args=(second,))
    t2.start()  # joins the group: the first worker must give up partitions while its batch is in the engine
    assert seen.revoking.wait(60), "no rebalance while the engine was busy"
    gated.release.set()
    t1.join(120)
    t2.join(120)
    assert not t1.is_alive() and not t2.is_alive() and not errors, errors
    counts = verdict_counts(s)
    lost, duplicated = ids - set(counts), sum(c - 1 for c in counts.values())
    print(
        f"rebalance: posts={len(ids)} first={first.stats.consumed} second={second.stats.consumed} "
        f"lost={len(lost)} duplicated={duplicated}"
    )
    assert not lost and duplicated == 0
    assert second.stats.consumed > 0
