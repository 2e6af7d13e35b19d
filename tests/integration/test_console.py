"""Review console: queue building, claims with leases, label rules, auth/CSRF, escaping, media.

The store runs on the session's real Redis and images come from the real S3 server; the label tests
record published events with an in-memory publisher (the browser test publishes to the real broker).
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from starlette.testclient import TestClient

from guard.samples import drawn_image, png_bytes
from guard.taxonomy import Taxonomy
from schemas.events import (
    AlertEvent,
    DeadLetterEvent,
    ErrorCode,
    ReviewEvent,
    Scores,
    VerdictEvent,
    WindowCount,
)
from tests.conftest import BUCKET, Services
from tests.support import clean_env, subprocess_env
from workers.console.app import Console, build_console, create_app
from workers.console.ingest import Ingester
from workers.console.settings import ConsoleSettings
from workers.console.store import Filters, QueueStore, Reason
from workers.reviews import ReviewError, build_review
from workers.settings import Settings, settings_environ

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def console_settings(settings: Settings, **kw: Any) -> ConsoleSettings:
    sfx = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        **settings.model_dump(),
        "reviews_topic": f"reviews-{sfx}",
        "alerts_topic": f"alerts-{sfx}",
        "audit_topic": f"audit-{sfx}",
        "alerts_app_id": f"alerts-app-{sfx}",
        "console_prefix": f"gs:console:test-{sfx}:",
        "console_group_id": f"{settings.group_id}-console",
        "console_tokens": f"alice:{ALICE},bob:{BOB}",
        "console_port": 0,
    }
    values.update(kw)
    return ConsoleSettings(**values)


def verdict(pid: str, *, safe: bool | None, p: float | None = None, **kw: Any) -> VerdictEvent:
    base: dict[str, Any] = {
        "post_id": pid,
        "author_id": "u1",
        "modality": "text",
        "safe": safe,
        "scores": Scores(p_unsafe=p),
        "engine": "cpu",
        "model_version": "m",
        "policy_version": "p",
        "content_hash": "h",
        "cache_hit": False,
        "latency_ms": 1.0,
        "source_topic": "posts",
        "source_partition": 0,
        "source_offset": 0,
        "post_created_at": NOW,
        "decided_at": NOW,
    }
    base.update(kw)
    return VerdictEvent(**base)


def post_bytes(pid: str, text: str | None, images: list[str] | None = None) -> bytes:
    from workers.demo.sample_feed import post

    return post(pid, "u1", text, images or [], at=NOW)


class Posts:
    """Stands in for the posts topic's offset lookup in the ingester's unit tests."""

    def __init__(self) -> None:
        self.by_offset: dict[int, bytes] = {}

    def add(self, pid: str, text: str | None, images: list[str] | None = None) -> int:
        off = len(self.by_offset)
        self.by_offset[off] = post_bytes(pid, text, images)
        return off

    def get(self, _topic: str, _partition: int, offset: int) -> bytes | None:
        return self.by_offset.get(offset)


@pytest.fixture
def cs(kafka_settings: Settings) -> ConsoleSettings:
    return console_settings(kafka_settings)


@pytest.fixture
def store(cs: ConsoleSettings) -> QueueStore:
    return QueueStore(cs.store_url, cs.console_prefix, cs.console_lease_s)


def ingest(ing: Ingester, topic: str, ev: Any, posts: Posts) -> None:
    ing.handle(topic, ev.model_dump_json().encode(), posts.get)


# ------------------------------------------------------------------------------------------ queue
@pytest.mark.integration
def test_queue_is_built_from_verdicts_dead_letters_and_alerts(cs: ConsoleSettings, store: QueueStore) -> None:
    ing = Ingester(cs, store)
    posts = Posts()
    v, d = cs.verdicts_topic, cs.dlq_topic
    ingest(
        ing,
        v,
        verdict("abst", safe=None, modality="image", source_offset=posts.add("abst", None, ["s3://b/x.png"])),
        posts,
    )
    ingest(
        ing,
        v,
        verdict("band", safe=False, p=0.55, category="C1", source_offset=posts.add("band", "hmm")),
        posts,
    )
    ingest(ing, v, verdict("sure", safe=True, p=0.02, source_offset=posts.add("sure", "hello")), posts)
    ingest(
        ing,
        v,
        verdict("edge", safe=False, p=0.66, category="C1", source_offset=posts.add("edge", "x")),
        posts,
    )
    ingest(
        ing,
        v,
        verdict(
            "novel",
            safe=False,
            p=0.9,
            category="C9",
            subcategory="C9S1",
            novel_risk="Blackout Challenge",
            source_offset=posts.add("novel", "try it"),
        ),
        posts,
    )
    # an engine dead letter carries the post in its original bytes; a malformed event is not reviewable
    raw = post_bytes("parse", "an engine choked on this")
    dl = DeadLetterEvent(
        post_id="parse",
        error_code=ErrorCode.ENGINE_OUTPUT_UNPARSEABLE,
        error_class="ParseError",
        message="no <answer>",
        source_topic="posts",
        source_partition=0,
        source_offset=9,
        original_value_b64=base64.b64encode(raw).decode(),
    )
    ingest(ing, d, dl, posts)
    bad = dl.model_copy(update={"post_id": "bad", "error_code": ErrorCode.INVALID_JSON})
    ingest(ing, d, bad, posts)

    # a verdict whose engine output did not parse (published, not dead-lettered): a dead letter to settle
    unparsed = verdict("unparsed", safe=True, p=0.01, parse_error=True, raw_output="<answer>maybe")
    ingest(ing, v, unparsed.model_copy(update={"source_offset": posts.add("unparsed", "hm")}), posts)
    got = store.get("unparsed")
    assert got is not None and got.reasons == [Reason.DEAD_LETTER] and got.raw_output == "<answer>maybe"
    assert {it.post_id for it in store.page(Filters(reason="dead_letter"))[0]} == {"unparsed", "parse"}

    ids = {it.post_id for it in store.iter_open()}
    assert ids == {
        "abst",
        "band",
        "novel",
        "parse",
        "unparsed",
    }  # band is [0.35, 0.65]: 0.66 and 0.02 stay out
    assert store.get("abst").reasons == [Reason.ABSTAINED]  # type: ignore[union-attr]
    partly = verdict("partly", safe=True, p=0.1, abstained_reason="image not judged", modality="text_image")
    ingest(
        ing,
        v,
        partly.model_copy(update={"source_offset": posts.add("partly", "hi", ["s3://b/y.png"])}),
        posts,
    )
    assert store.get("partly").reasons == [Reason.ABSTAINED]  # type: ignore[union-attr]
    assert store.get("band").reasons == [Reason.UNCERTAIN]  # type: ignore[union-attr]
    # unsafe with no taxonomy category is a novel risk (what the alerts app clusters)
    ingest(ing, v, verdict("nocat", safe=False, p=0.9, source_offset=posts.add("nocat", "new thing")), posts)
    assert store.get("nocat").reasons == [Reason.NOVEL_RISK]  # type: ignore[union-attr]
    novel = store.get("novel")
    assert novel is not None and novel.reasons == [Reason.NOVEL_RISK] and novel.text == "try it"
    assert novel.category == "C9S1" and novel.category_name is None
    parse = store.get("parse")
    assert parse is not None and parse.dead_letter_code == "engine_output_unparseable"
    assert parse.text == "an engine choked on this" and parse.reasons == [Reason.DEAD_LETTER]

    # an alert marks its example posts, including one whose verdict arrives later
    alert = AlertEvent(
        alert_id="a1",
        cluster_id="k1",
        representative="Blackout Challenge",
        examples=["novel", "later"],
        example_descriptions=["Blackout Challenge"],
        size=21,
        counts_per_window=[WindowCount(window_start=NOW, count=21)],
        window_seconds=3600,
        growth=21.0,
        distinct_authors=21,
        modalities={"text": 21},
        first_seen=NOW,
        last_seen=NOW,
        level=1,
    )
    ingest(ing, cs.alerts_topic, alert, posts)
    ingest(ing, v, verdict("later", safe=True, p=0.1, source_offset=posts.add("later", "me too")), posts)
    assert set(store.get("later").reasons) == {Reason.ALERTED_CLUSTER}  # type: ignore[union-attr]
    assert store.get("novel").clusters == ["k1"]  # type: ignore[union-attr]
    assert {it.post_id for it in store.page(Filters(cluster="k1"))[0]} == {"novel", "later"}

    # filters and the urgent order (alerted cluster > novel risk > uncertain > dead letter > abstained)
    assert [it.post_id for it in store.page(Filters(reason="uncertain"))[0]] == ["band"]
    assert [it.post_id for it in store.page(Filters(modality="image"))[0]] == ["abst"]
    assert [it.post_id for it in store.page(Filters(category="C9"))[0]] == ["novel"]
    order = [it.post_id for it in store.iter_open(urgent=True)]
    assert order.index("novel") < order.index("band") < order.index("parse") < order.index("abst")

    # a review from the reviews topic (e.g. `guardstream review`) closes the item; re-delivery is a no-op
    rv = ReviewEvent(post_id="band", unsafe=False, reviewer_id="carol")
    ingest(ing, cs.reviews_topic, rv, posts)
    ingest(ing, cs.reviews_topic, rv, posts)
    assert "band" not in {it.post_id for it in store.iter_open()}
    assert store.get("band").label.reviewer_id == "carol"  # type: ignore[union-attr]
    # a re-delivered verdict does not re-open a labelled post
    ingest(ing, v, verdict("band", safe=False, p=0.55, source_offset=1), posts)
    assert "band" not in {it.post_id for it in store.iter_open()}


@pytest.mark.integration
def test_claims_are_exclusive_and_leases_expire(store: QueueStore) -> None:
    assert store.claim("p1", "alice").ok
    assert store.claim("p1", "alice").ok  # renewing one's own claim
    taken = store.claim("p1", "bob")
    assert not taken.ok and taken.holder == "alice" and taken.expires_in_s > 0
    assert not store.release("p1", "bob")  # nobody releases someone else's claim
    assert store.release("p1", "alice") and store.claim("p1", "bob").ok

    store.lease_ms = 150
    assert store.claim("p2", "alice").ok
    assert not store.claim("p2", "bob").ok
    deadline = time.monotonic() + 5
    while store.holder("p2").holder is not None and time.monotonic() < deadline:
        time.sleep(0.02)  # waiting for Redis to expire the key: the lease itself is what is tested
    assert store.claim("p2", "bob").ok


@pytest.mark.integration
def test_next_never_hands_one_post_to_two_reviewers(cs: ConsoleSettings, store: QueueStore) -> None:
    ing = Ingester(cs, store)
    posts = Posts()
    for i in range(3):
        ingest(
            ing, cs.verdicts_topic, verdict(f"n{i}", safe=None, source_offset=posts.add(f"n{i}", "t")), posts
        )
    a = store.next_for("alice", Filters())
    b = store.next_for("bob", Filters())
    c = store.next_for("carol", Filters())
    assert a and b and c and len({a.post_id, b.post_id, c.post_id}) == 3
    assert store.next_for("dave", Filters()) is None
    store.skip(a.post_id, "alice")  # put aside: someone else may take it, alice gets a different one
    assert store.next_for("dave", Filters()).post_id == a.post_id  # type: ignore[union-attr]


@pytest.mark.integration
def test_concurrent_reviewers_get_distinct_posts(cs: ConsoleSettings, store: QueueStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    ing = Ingester(cs, store)
    posts = Posts()
    for i in range(12):
        ingest(
            ing, cs.verdicts_topic, verdict(f"c{i}", safe=None, source_offset=posts.add(f"c{i}", "t")), posts
        )
    # 16 reviewers race for 12 posts, each on its own connection: every post goes to exactly one
    stores = [QueueStore(cs.store_url, cs.console_prefix, cs.console_lease_s) for _ in range(16)]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: stores[i].next_for(f"r{i}", Filters()), range(16)))
    ids = [it.post_id for it in got if it is not None]
    assert sorted(ids) == sorted(f"c{i}" for i in range(12))
    assert store.counts()["abstained"] == 12 and store.counts()["open"] == 12


# ------------------------------------------------------------------------------------------ labels
def test_review_rules_are_shared_with_the_cli() -> None:
    tax = Taxonomy.load()
    with pytest.raises(ReviewError, match="contradictory"):
        build_review(tax, post_id="p", unsafe=False, category="C9S1", reviewer_id="r")
    with pytest.raises(ReviewError, match="contradictory"):
        build_review(tax, post_id="p", unsafe=False, novel_risk="thing", reviewer_id="r")
    with pytest.raises(ReviewError, match="not in the taxonomy"):
        build_review(tax, post_id="p", unsafe=True, category="C99S9", reviewer_id="r")
    ev = build_review(tax, post_id="p", unsafe=True, category=" c9s1 ", novel_risk="  ", reviewer_id="r")
    assert (ev.category, ev.novel_risk) == ("C9S1", None)
    from workers.cli import main

    with pytest.raises(SystemExit, match="contradictory"):  # the CLI refuses before touching the broker
        main(["review", "p", "--safe", "--category", "C9S1", "--reviewer", "r", "--bootstrap-servers", "x:1"])


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``guardstream`` in-process: (exit code, stderr), a SystemExit message counted as stderr. ``main``
    points structlog at the captured stderr, which pytest closes after the test: restored after."""
    import structlog

    from workers.cli import main

    saved = structlog.get_config()
    try:
        rc, extra = main(argv), ""
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
        extra = "" if isinstance(exc.code, int) or exc.code is None else str(exc.code)
    finally:
        structlog.configure(**saved)
    return rc, capsys.readouterr().err + extra


@pytest.mark.integration
def test_cli_review_refuses_a_post_nothing_knows(
    cs: ConsoleSettings,
    store: QueueStore,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As the console answers 404 for a post it does not know, `guardstream review` refuses one: it must
    be queued in the console's store, or have a verdict or dead letter in the topics' newest records."""
    from infra.stack import create_topics
    from workers.console.store import QueueItem
    from workers.kafka.topics import produce_all, read_topic

    produce_all(
        cs.bootstrap_servers,
        cs.verdicts_topic,
        [(b"cli-v", verdict("cli-v", safe=True, p=0.01).model_dump_json().encode())],
    )
    raw = post_bytes("cli-d", "the engine choked")
    dl = DeadLetterEvent(
        post_id="cli-d",
        error_code=ErrorCode.ENGINE_FAILED,
        error_class="EngineError",
        message="boom",
        source_topic=cs.posts_topic,
        source_partition=0,
        source_offset=0,
        original_value_b64=base64.b64encode(raw).decode(),
    )
    produce_all(cs.bootstrap_servers, cs.dlq_topic, [(b"some-other-key", dl.model_dump_json().encode())])
    # queued in the console but not in the topics' tails (say, a post older than --lookback)
    store.upsert(QueueItem(post_id="cli-s", modality="text", reasons=[Reason.ABSTAINED], decided_at=NOW))
    create_topics(cs.bootstrap_servers, {cs.reviews_topic: 1})
    for key, value in {**settings_environ(cs), "GUARDSTREAM_LOG_FORMAT": "json"}.items():
        monkeypatch.setenv(key, value)
    review = ["review", "--safe", "--reviewer", "carol"]

    for pid in ("cli-v", "cli-d", "cli-s"):  # a verdict, a dead letter (by its JSON, not its key), the store
        rc, err = _cli([*review, pid], capsys)
        assert rc == 0, err
    rc, err = _cli([*review, "cli-typo"], capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 1 and len(lines) == 1, err
    assert "'cli-typo' not found" in lines[0] and "--force" in lines[0] and "Traceback" not in err
    # the scan is bounded: with a newer record after it, the verdict is outside --lookback 1
    produce_all(
        cs.bootstrap_servers,
        cs.verdicts_topic,
        [(b"cli-v", verdict("cli-v-again", safe=True, p=0.01).model_dump_json().encode())],
    )
    rc, err = _cli([*review, "--lookback", "1", "cli-v"], capsys)
    assert rc == 1 and "'cli-v' not found" in err and "newest 1 records" in err
    rc, err = _cli([*review, "--force", "cli-typo"], capsys)  # the escape hatch publishes anyway
    assert rc == 0, err
    published = [
        ReviewEvent.model_validate_json(v).post_id for v in read_topic(cs.bootstrap_servers, cs.reviews_topic)
    ]
    assert published == ["cli-v", "cli-d", "cli-s", "cli-typo"]


class App:
    def __init__(self, cs: ConsoleSettings) -> None:
        self.published: list[ReviewEvent] = []
        self.console: Console = build_console(cs, publish=self.published.append)
        self.client = TestClient(create_app(self.console), follow_redirects=False)

    def login(self, token: str = ALICE) -> App:
        r = self.client.get(f"/login?token={token}")
        assert r.status_code == 303, r.text
        return self

    def csrf(self, path: str) -> str:
        m = re.search(r'name="csrf" value="([^"]+)"', self.client.get(path).text)
        assert m
        return m.group(1)


@pytest.fixture
def app(cs: ConsoleSettings, store: QueueStore) -> App:
    ing = Ingester(cs, store)
    posts = Posts()
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    ingest(ing, cs.verdicts_topic, verdict("p1", safe=None, source_offset=posts.add("p1", hostile)), posts)
    ingest(
        ing, cs.verdicts_topic, verdict("p2", safe=False, p=0.5, source_offset=posts.add("p2", "b")), posts
    )
    return App(cs)


@pytest.mark.integration
def test_labels_publish_once_and_contradictions_are_refused(app: App) -> None:
    app.login()
    assert app.client.get("/").status_code == 200
    token = app.csrf("/post/p1")
    c = app.client

    assert c.post("/post/p1/label", data={"verdict": "safe"}).status_code == 403  # no CSRF token
    r = c.post("/post/p1/label", data={"csrf": token, "verdict": "safe", "category": "C9S1"})
    assert r.status_code == 400 and "contradictory" in r.text
    r = c.post("/post/p1/label", data={"csrf": token, "verdict": "unsafe"})
    assert r.status_code == 400 and "needs a category" in r.text
    r = c.post("/post/nope/label", data={"csrf": token, "verdict": "safe"})
    assert r.status_code == 404
    assert app.published == []

    r = c.post("/post/p1/label", data={"csrf": token, "verdict": "unsafe", "category": "C9S1"})
    assert r.status_code == 303 and r.headers["location"].startswith("/next")
    assert [(e.post_id, e.unsafe, e.category, e.reviewer_id) for e in app.published] == [
        ("p1", True, "C9S1", "alice")
    ]
    # the same form again (double submit) publishes nothing; a different label is refused
    assert (
        c.post("/post/p1/label", data={"csrf": token, "verdict": "unsafe", "category": "C9S1"}).status_code
        == 303
    )
    r = c.post("/post/p1/label", data={"csrf": token, "verdict": "safe"})
    assert r.status_code == 409 and "already labelled" in r.text
    assert len(app.published) == 1
    assert "p1" not in {it.post_id for it in app.console.store.iter_open()}


@pytest.mark.integration
def test_a_post_claimed_by_another_reviewer_cannot_be_labelled(app: App, cs: ConsoleSettings) -> None:
    bob = App(cs).login(BOB)
    assert "Claimed by you" in bob.client.get("/post/p2").text
    app.login()
    page = app.client.get("/post/p2").text
    assert "Claimed by <b>bob</b>" in page and 'id="label-form"' not in page
    r = app.client.post("/post/p2/label", data={"csrf": app.csrf("/"), "verdict": "safe"})
    assert r.status_code == 409 and "claimed by bob" in r.text
    assert app.published == []


@pytest.mark.integration
def test_identity_csrf_escaping_and_headers(app: App, cs: ConsoleSettings) -> None:
    c = app.client
    assert c.get("/").status_code == 303  # not signed in
    assert c.get("/login?token=wrong-token-0000000000").status_code == 401
    # a header only identifies a reviewer when the console is configured to trust it
    assert c.get("/", headers={"X-Reviewer": "mallory"}).status_code == 303
    proxied = App(cs.model_copy(update={"console_reviewer_header": "X-Reviewer"}))
    assert "mallory" in proxied.client.get("/", headers={"X-Reviewer": "mallory"}).text
    # bearer tokens work for API clients (no cookie, so no CSRF token needed)
    r = c.post(
        "/post/p2/label",
        data={"verdict": "safe"},
        headers={"Authorization": f"Bearer {BOB}"},
    )
    assert r.status_code == 303 and app.published[-1].reviewer_id == "bob"

    app.login()
    # every page renders for a signed-in reviewer; unknown posts and replays are 404s
    assert c.get("/clusters").status_code == 200 and "No clusters yet" in c.get("/clusters").text
    assert c.get("/audits").status_code == 200 and c.get("/audits/nope").status_code == 404
    assert c.get("/post/nope").status_code == 404
    assert ">p1</a>" in c.get("/?reason=abstained").text
    assert ">p1</a>" not in c.get("/?reason=uncertain").text
    page = c.get("/post/p1")
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page.text
    assert "<script>alert" not in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert c.get("/login?token=x&next=//evil.example").status_code == 401


@pytest.mark.integration
def test_images_come_through_the_workers_fetcher(
    cs: ConsoleSettings, store: QueueStore, services: Services
) -> None:
    s3 = services.s3_client()
    key = f"console/{uuid.uuid4().hex}.png"
    s3.put_object(Bucket=BUCKET, Key=key, Body=png_bytes(drawn_image(3)))
    s3.put_object(Bucket=BUCKET, Key=key + ".txt", Body=b"%PDF not an image")
    ing = Ingester(cs, store)
    posts = Posts()
    refs = [f"s3://{BUCKET}/{key}", f"s3://{BUCKET}/{key}.txt", "s3://someone-elses-bucket/a.png"]
    ingest(
        ing, cs.verdicts_topic, verdict("img", safe=None, source_offset=posts.add("img", None, refs)), posts
    )
    app = App(cs).login()
    ok = app.client.get("/media/img/0")
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    assert ok.content.startswith(b"\x89PNG")
    assert app.client.get("/media/img/1").text == "image unavailable: image_not_an_image"
    assert app.client.get("/media/img/2").text == "image unavailable: image_bucket_not_allowed"
    assert app.client.get("/media/img/3").status_code == 404  # only the post's own refs are fetched
    assert app.client.get("/media/unknown/0").status_code == 404


def test_settings_validate_tokens_and_band() -> None:
    with pytest.raises(ValueError, match="CONSOLE_TOKENS"):
        ConsoleSettings(console_tokens="alice:short")
    with pytest.raises(ValueError, match="BAND_LOW"):
        ConsoleSettings(console_band_low=0.8, console_band_high=0.2)
    assert ConsoleSettings().console_host == "127.0.0.1"
    with pytest.raises(ValueError, match="GUARDSTREAM_CONSOLE_TOKENS"):
        build_console(ConsoleSettings())


@pytest.mark.integration
def test_console_command_serves_on_loopback(cs: ConsoleSettings) -> None:
    """`guardstream console` with no identity configured: a one-time token, printed as a login URL."""
    import signal
    import subprocess
    import sys

    import httpx

    from infra.stack import free_port

    port = free_port()
    env = subprocess_env(cs, GUARDSTREAM_LOG_FORMAT="json")
    env.pop("GUARDSTREAM_CONSOLE_TOKENS", None)  # no identity configured
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "console", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed before the server starts listening
        m = re.search(r"(http://127\.0\.0\.1:\d+)/login\?token=(\S+)", line)
        assert m, line
        base, token = m.groups()
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"{base}/login", params={"token": token}, timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "console did not come up"
                time.sleep(0.1)
        assert r.status_code == 303 and "guardstream_console=" in r.headers["set-cookie"]
        assert httpx.get(f"{base}/login", params={"token": "nope" * 5}, timeout=2).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_demo_console_serves_the_queue_and_stops_cleanly(services: Services, tmp_path: Any) -> None:
    """`guardstream demo --console`: its own local stack (broker, S3 server; the session's Redis as the
    store), the demo feed moderated, then the console: the login URL on stdout, the queue page behind
    it, and on Ctrl-C a clean exit with nothing left listening (~20 s on the dev machine)."""
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    from infra.stack import free_port

    def listening(port: int) -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    port = free_port()
    env = clean_env(
        GUARDSTREAM_REDIS_URL=services.redis_url,  # ours: the demo empties its console prefix there
        GUARDSTREAM_CONSOLE_PORT=str(port),
        GUARDSTREAM_LOG_FORMAT="json",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "demo", "--console"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        for line in proc.stdout:  # ends when the demo exits: then the assertion below says what it printed
            seen.append(line)
            if "/login?token=" in line:
                break
        out = "".join(seen)
        m = re.search(r"(http://127\.0\.0\.1:\d+)/login\?token=(\S+)", out)
        assert m, out[-3000:]
        base, token = m.groups()
        assert base.endswith(f":{port}")
        stack = re.search(
            r"--bootstrap-servers 127\.0\.0\.1:(\d+) --s3-endpoint-url http://127\.0\.0\.1:(\d+)", out
        )
        assert stack, out[-3000:]
        ports = [port, int(stack[1]), int(stack[2])]
        with httpx.Client(base_url=base, timeout=5) as client:
            deadline = time.monotonic() + 30
            while True:  # the URL is printed before uvicorn listens
                try:
                    r = client.get("/login", params={"token": token})
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline and proc.poll() is None, "console did not come up"
                    time.sleep(0.1)
            assert r.status_code == 303
            # the demo's three image posts (the CPU engine abstains on images) are queued
            deadline = time.monotonic() + 30
            images = [f"demo-image-{i}" for i in range(3)]
            while True:  # the ingester reads the demo's topics in the background, partition by partition
                page = client.get("/", params={"reason": "abstained"})
                if page.status_code == 200 and all(i in page.text for i in images):
                    break
                assert time.monotonic() < deadline, page.text[-2000:]
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert [p for p in ports if listening(p)] == []  # console, broker and S3 server all gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
