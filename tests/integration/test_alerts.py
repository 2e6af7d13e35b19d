"""Emerging-risk alerts: the faust app on the real broker, with a restart in the middle of a burst, and
the review console queueing every member of an alerted cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from infra.stack import create_topics
from schemas.codec import decode_post
from schemas.events import AlertEvent, Scores, VerdictEvent
from tests.conftest import Services
from tests.integration.test_console import console_settings
from tests.support import subprocess_env
from workers.alerts.app import describe, read_clusters
from workers.alerts.clustering import (
    MAX_RECENT_IDS,
    Cluster,
    ClusterConfig,
    add,
    check_alert,
    merge_near_duplicates,
)
from workers.console.ingest import Ingester
from workers.console.store import Filters, QueueStore, Reason
from workers.demo.sample_feed import post
from workers.kafka.topics import produce_all, read_records, read_topic
from workers.settings import Settings

T = datetime(2026, 6, 1, 12, 5, tzinfo=UTC)  # every planted post falls in the 12:00-13:00 window
BURST = [
    "Blackout Choking Challenge Trend",
    "Viral Choking Game Challenge",
    "Teens Choking Themselves Challenge",
    "Pass Out Choking Challenge Videos",
    "Breath Holding Blackout Challenge",
    "Dangerous Choking Dare Trend",
    "Blackout Challenge Among Kids",
    "Choking Game Spreading Online",
    "Strangulation Blackout Dare",
    "Fainting Choking Challenge Trend",
    "Kids Blackout Choking Game",
    "Choke Until Pass Out Challenge",
]
BACKGROUND = [
    "Counterfeit Concert Ticket Resale",
    "Deepfake Celebrity Crypto Endorsement",
    "Fake Charity Donation Links",
    "Unlicensed Home Dental Procedures",
    "Pet Medication Overdose Advice",
    "Illegal Fireworks Modification Guide",
    "Stolen Loyalty Points Marketplace",
    "Fake Job Offer Deposit Scam",
    "Unsafe Homemade Baby Formula",
    "Drone Flights Over Airports",
    "Lottery Prize Advance Fee",
    "AI Voice Clone Ransom Calls",
]
SPAM = "Miracle Weight Loss Pill Spam"


def verdict(post_id: str, author: str, novel: str, minutes: int = 0) -> bytes:
    return json.dumps(
        {
            "post_id": post_id,
            "author_id": author,
            "modality": "text",
            "safe": False,
            "category": None,
            "novel_risk": novel,
            "post_created_at": (T + timedelta(minutes=minutes)).isoformat(),
        }
    ).encode()


def test_alert_rule_unit() -> None:
    cfg = ClusterConfig(min_count=3, min_authors=2, window_s=60)
    clusters: dict[str, Any] = {}
    v = np.ones(4, dtype=np.float32) / 2
    for i in range(3):
        c = add(clusters, cfg, v, post_id=f"p{i}", text="x", author="same", modality="text", ts=120.0)
    assert check_alert(c, cfg, 120.0) is None  # one author is not an emerging risk
    c = add(clusters, cfg, v, post_id="p3", text="x", author="other", modality="image", ts=121.0)
    first = check_alert(c, cfg, 121.0)
    assert (
        first is not None
        and first.level == 1
        and first.size == 4
        and first.modalities == {"text": 3, "image": 1}
    )
    assert (
        first is not None
        and first.member_ids == ["p0", "p1", "p2", "p3"]
        and first.examples
        == [
            "p0",
            "p1",
            "p2",
            "p3",
        ]
    )
    assert check_alert(c, cfg, 121.0) is None  # deduplicated until it escalates
    for i in range(4):
        add(clusters, cfg, v, post_id=f"q{i}", text="x", author=f"a{i}", modality="text", ts=122.0)
    again = check_alert(c, cfg, 122.0)
    assert again is not None and again.level == 2
    w = np.array([0.5, 0.5, 0.5, -0.5], dtype=np.float32)
    add(
        clusters,
        ClusterConfig(join_threshold=0.99),
        w,
        post_id="z",
        text="y",
        author="b",
        modality="text",
        ts=1.0,
    )
    assert len(clusters) == 2
    assert merge_near_duplicates(clusters, ClusterConfig(merge_threshold=0.4)) and len(clusters) == 1
    assert next(iter(clusters.values())).recent[-1][1] == "q3"
    assert describe({"novel_risk": "  new   thing "}) == "new thing"
    assert describe({"safe": False, "category": None}) and describe({"safe": True}) is None


def test_alert_names_its_most_recent_members_bounded() -> None:
    cfg = ClusterConfig(min_count=1, min_authors=1, min_growth=0.0, window_s=10**9)
    clusters: dict[str, Cluster] = {}
    v = np.ones(4, dtype=np.float32) / 2
    n = MAX_RECENT_IDS + 7
    for i in reversed(range(n)):  # arrival order is not time order: the newest by post time are kept
        c = add(clusters, cfg, v, post_id=f"p{i}", text="x", author=f"a{i}", modality="text", ts=float(i))
    a = check_alert(c, cfg, float(n))
    assert a is not None and a.size == n and len(a.examples) == cfg.examples
    assert a.member_ids == [f"p{i}" for i in range(7, n)]  # the total is `size`; oldest first
    # the schema's description states the same bound
    desc = AlertEvent.model_fields["member_ids"].description or ""
    assert f"at most {MAX_RECENT_IDS} members" in desc and f"the {MAX_RECENT_IDS} most recent" in desc
    # a cluster state written before `recent` existed still loads, and fills up from the next member on
    old = c.to_dict()
    del old["recent"]
    restored = {c.cluster_id: Cluster.from_dict(old)}
    add(restored, cfg, v, post_id="new", text="x", author="b", modality="text", ts=float(n + 1))
    assert restored[c.cluster_id].recent == [[float(n + 1), "new"]]
    # merging keeps the most recent of both
    other = ClusterConfig(join_threshold=0.99)
    w = np.array([0.5, 0.5, 0.5, -0.5], dtype=np.float32)
    add(restored, other, w, post_id="newest", text="y", author="c", modality="text", ts=float(n + 2))
    assert len(restored) == 2 and merge_near_duplicates(restored, ClusterConfig(merge_threshold=0.4))
    (merged,) = restored.values()
    assert [pid for _, pid in merged.recent] == ["new", "newest"]


@pytest.fixture
def alert_settings(kafka_settings: Settings) -> Settings:
    s = kafka_settings.model_copy(
        update={
            "alerts_topic": kafka_settings.posts_topic + "-alerts",
            "alerts_app_id": "alerts-" + kafka_settings.group_id,
        }
    )
    create_topics(s.bootstrap_servers, {s.novel_risk_topic: 1, s.alerts_topic: 1})
    return s


def start_app(s: Settings) -> subprocess.Popen[bytes]:
    env = subprocess_env(
        s,
        GUARDSTREAM_ALERT_MIN_COUNT="20",
        GUARDSTREAM_ALERT_MIN_AUTHORS="5",
        GUARDSTREAM_LOG_FORMAT="json",
        GUARDSTREAM_SESSION_TIMEOUT_MS="6000",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "alerts"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_for(cond: Any, proc: subprocess.Popen[bytes], what: str, timeout: float = 150.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"alerts app exited ({proc.returncode}) waiting for {what}: "
                f"{(proc.stdout.read() if proc.stdout else b'').decode()[-2000:]}"
            )
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def app_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()


@pytest.mark.integration
def test_planted_burst_alerts_once_and_survives_restart(
    alert_settings: Settings, services: Services, app_procs: list[subprocess.Popen[bytes]]
) -> None:
    s = alert_settings
    total = lambda: sum(c.size for c in read_clusters(s).values())  # noqa: E731

    def alerts():
        return [
            AlertEvent.model_validate_json(v)
            for v in read_topic(
                s.bootstrap_servers,
                s.alerts_topic,
                timeout_s=5,
            )
        ]

    app_procs.append(start_app(s))
    first_half = [verdict(f"burst-a{i}", f"author-a{i}", t, i) for i, t in enumerate(BURST)]
    background = [verdict(f"bg-{i}", f"bg-author-{i}", t, i) for i, t in enumerate(BACKGROUND)]
    flood = [verdict(f"spam-{i}", "spammer", SPAM, i % 20) for i in range(25)]
    produce_all(s.bootstrap_servers, s.novel_risk_topic, [(None, v) for v in first_half + background + flood])
    wait_for(lambda: total() == 49, app_procs[0], "49 clustered descriptions")
    assert alerts() == []  # 12 burst posts: below the threshold; the flood has one author
    stop(app_procs[0])
    assert app_procs[0].returncode == 0

    app_procs.append(start_app(s))  # state comes back from the changelog
    second_half = [verdict(f"burst-b{i}", f"author-b{i}", t, 12 + i) for i, t in enumerate(BURST)]
    produce_all(s.bootstrap_servers, s.novel_risk_topic, [(None, v) for v in second_half])
    wait_for(lambda: total() == 61, app_procs[1], "61 clustered descriptions")
    wait_for(lambda: len(alerts()) >= 1, app_procs[1], "the burst alert")
    got = alerts()
    assert len(got) == 1, [a.representative for a in got]
    a = got[0]
    assert a.size == 24 and a.distinct_authors == 24 and a.level == 1
    assert a.representative in BURST and set(a.example_descriptions) <= set(BURST)
    assert all(e.startswith("burst-") for e in a.examples) and len(a.examples) == 5
    assert a.counts_per_window[-1].count == 24 and a.window_seconds == 3600 and a.modalities == {"text": 24}
    clusters = read_clusters(s)
    spam = [c for c in clusters.values() if c.medoid() == SPAM]
    assert len(spam) == 1 and spam[0].size == 25 and spam[0].level == 0
    burst = clusters[a.cluster_id]
    assert burst.size == 24 and {m["text"] for m in burst.members} <= set(BURST)
    stop(app_procs[1])
    print(
        f"alerts: {len(first_half + second_half)} burst, {len(background)} background, {len(flood)} flood "
        f"posts -> {len(got)} alert, {len(clusters)} clusters"
    )


def _novel_verdict(pid: str, author: str, novel: str, i: int, where: tuple[int, int], s: Settings) -> bytes:
    return (
        VerdictEvent(
            post_id=pid,
            author_id=author,
            modality="text",
            safe=False,
            novel_risk=novel,
            scores=Scores(p_unsafe=0.9),
            engine="cpu",
            model_version="m",
            policy_version="p",
            content_hash=pid,
            cache_hit=False,
            latency_ms=1.0,
            source_topic=s.posts_topic,
            source_partition=where[0],
            source_offset=where[1],
            post_created_at=T + timedelta(seconds=i),
        )
        .model_dump_json()
        .encode()
    )


def _poll(cond: Any, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # a poll interval on a condition, not a stand-in for one


@pytest.mark.integration
def test_every_member_of_an_alerted_cluster_is_queued(
    alert_settings: Settings, services: Services, app_procs: list[subprocess.Popen[bytes]]
) -> None:
    """31 burst posts: the alerts app alerts once (the 31st brings the fifth author), the console queues
    all 31 under the cluster filter — 15 verdicts it ingested before the alert, 16 after it."""
    s = alert_settings
    n = 31
    ids = [f"member-{i}" for i in range(n)]
    authors = [f"author-{i % 4}" for i in range(n - 1)] + ["author-fifth"]
    produce_all(
        s.bootstrap_servers,
        s.posts_topic,
        [
            (pid.encode(), post(pid, a, f"post {i}", at=T))
            for i, (pid, a) in enumerate(zip(ids, authors, strict=True))
        ],
    )
    where = {
        decode_post(r.value).post_id: (r.partition, r.offset)
        for r in read_records(s.bootstrap_servers, s.posts_topic)
        if r.value
    }
    verdicts = [
        _novel_verdict(pid, a, BURST[i % len(BURST)], i, where[pid], s)
        for i, (pid, a) in enumerate(zip(ids, authors, strict=True))
    ]
    cs = console_settings(s, alerts_topic=s.alerts_topic, alerts_app_id=s.alerts_app_id)
    store = QueueStore(cs.store_url, cs.console_prefix, cs.console_lease_s)
    ing = Ingester(cs, store).start()
    try:
        # verdicts before the alert: queued as novel risks, tagged when the alert arrives
        produce_all(
            s.bootstrap_servers,
            s.verdicts_topic,
            [(p.encode(), v) for p, v in zip(ids, verdicts, strict=True)][:15],
        )
        _poll(lambda: store.counts()["novel_risk"] == 15, "15 novel-risk items")
        app_procs.append(start_app(s))
        produce_all(s.bootstrap_servers, s.novel_risk_topic, [(None, v) for v in verdicts[:-1]])
        total = lambda: sum(c.size for c in read_clusters(s).values())  # noqa: E731
        wait_for(lambda: total() == n - 1, app_procs[0], f"{n - 1} clustered descriptions")
        produce_all(s.bootstrap_servers, s.novel_risk_topic, [(None, verdicts[-1])])  # the fifth author
        _poll(lambda: bool(store.alerts()) or app_procs[0].poll() is not None, "the alert in the store", 150)
        assert app_procs[0].poll() is None, "the alerts app exited"
        (alert,) = store.alerts().values()
        assert alert.size == n and sorted(alert.member_ids or []) == sorted(ids) and len(alert.examples) == 5
        # verdicts after the alert: the console tags them as they arrive
        produce_all(
            s.bootstrap_servers,
            s.verdicts_topic,
            [(p.encode(), v) for p, v in zip(ids, verdicts, strict=True)][15:],
        )
        cluster = Filters(cluster=alert.cluster_id)
        _poll(lambda: store.page(cluster, limit=0)[1] == n, f"{n} posts under the cluster filter")
        items, count = store.page(cluster, limit=100)
        assert count == n and sorted(it.post_id for it in items) == sorted(ids)
        assert all(Reason.ALERTED_CLUSTER in it.reasons and it.text for it in items)
        assert ing.alive
    finally:
        ing.stop()
        stop(app_procs[0])
