"""The review console in a real browser (Debian's chromium, headless, driven by Playwright) against the
real local broker, S3 server and Redis: seed the demo feed, moderate it with the CPU engine, open the
queue, label three posts with the keyboard only, then check the reviews topic holds exactly those three
``ReviewEvent``s and that the training export carries them as human labels.

``GUARDSTREAM_SCREENSHOTS=docs/screenshots`` also saves a PNG of each page (the README's screenshots).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from guard.engines.cpu.engine import CpuEngine, CpuEngineConfig
from guard.prompts import PromptSet
from guard.taxonomy import Taxonomy
from infra.stack import create_topics
from schemas.events import AlertEvent, ReviewEvent, WindowCount
from tests.conftest import BUCKET, Services
from tests.integration.test_console import ALICE, console_settings
from training.export import TrainingExporter, parse_ratios
from workers.audit.replay import Replayer
from workers.console.server import ConsoleServer
from workers.console.store import Filters
from workers.demo.sample_feed import build_feed, planted_burst
from workers.kafka.topics import produce_all, read_topic
from workers.settings import Settings
from workers.wiring import build_fetcher, build_moderator, build_worker

playwright_api = pytest.importorskip("playwright.sync_api")


def chromium_path() -> str:
    path = (
        os.environ.get("GUARDSTREAM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if path is None:
        pytest.fail("Debian's chromium is not installed: apt-get install -y chromium (.ci/run does this)")
    return path


def seed_alert(bootstrap: str, topic: str, members: list[str]) -> None:
    """An alert as the alerts app publishes it (running the faust app is test_alerts.py's job)."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    counts = [1, 0, 2, 1, 1, 3, 2, 21]
    alert = AlertEvent(
        alert_id="alert-demo-1",
        cluster_id="c-blackout",
        representative="Blackout Challenge: choking until fainting, filmed",
        examples=members,
        example_descriptions=["Try the blackout challenge", "New trend: choke yourself until you faint"],
        size=sum(counts),
        counts_per_window=[
            WindowCount(window_start=now - timedelta(hours=len(counts) - 1 - i), count=n)
            for i, n in enumerate(counts)
        ],
        window_seconds=3600,
        growth=21 / 1.4,
        distinct_authors=21,
        modalities={"text": 21},
        first_seen=now - timedelta(hours=7),
        last_seen=now,
        level=1,
    )
    create_topics(bootstrap, {topic: 1})
    produce_all(bootstrap, topic, [(alert.cluster_id.encode(), alert.model_dump_json().encode())])


@pytest.mark.integration
def test_reviewer_clears_the_image_queue_with_the_keyboard(
    kafka_settings: Settings, services: Services, cpu_engine: CpuEngine, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    cs = console_settings(kafka_settings)
    shots = os.environ.get("GUARDSTREAM_SCREENSHOTS")

    # --- a moderated feed: the demo posts through the worker with the CPU engine
    feed, objects = build_feed(BUCKET)
    burst = planted_burst(8)  # novel-risk posts, and the members of the alert below
    feed += burst
    s3 = services.s3_client()
    for key, data in objects.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    produce_all(cs.bootstrap_servers, cs.posts_topic, [(p.key, p.value) for p in feed])
    build_worker(cs, cpu_engine).run(until_drained=True)
    seed_alert(cs.bootstrap_servers, cs.alerts_topic, [p.key for p in burst[:5]])
    create_topics(cs.bootstrap_servers, {cs.audit_topic: 1})
    Replayer(
        # an audit at a stricter threshold than the live run, so the report has flips to show
        build_moderator(
            cs.model_copy(update={"cache_enabled": False}),
            CpuEngine(PromptSet(Taxonomy.load()), CpuEngineConfig(threshold=0.0001)),
        ),
        cs.bootstrap_servers,
        verdicts_topic=cs.verdicts_topic,
        dlq_topic=cs.dlq_topic,
        audit_topic=cs.audit_topic,
    ).run("audit-before-retrain", cs.posts_topic, None, None, None)
    image_posts = {p.key for p in feed if p.key.startswith("demo-image-")}
    assert len(image_posts) == 3

    server = ConsoleServer(cs).start()
    try:
        store = server.console.store
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the ingester consumes the topics on its own thread
            queued = {it.post_id for it in store.page(Filters(modality="image"))[0]}
            if queued == image_posts and store.alerts():
                break
            time.sleep(0.1)
        assert queued == image_posts, "the CPU engine abstains on image-only posts: all three are queued"

        with playwright_api.sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=chromium_path(), headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(15_000)
            page.goto(f"{server.url}/")
            page.wait_for_url("**/login**")
            page.fill("input[name=token]", ALICE)
            page.keyboard.press("Enter")
            page.wait_for_url(f"{server.url}/")
            if shots:
                save(page, shots, "queue")
            page.goto(f"{server.url}/?modality=image")
            assert page.locator("table.queue tbody tr").count() == 3

            labelled: dict[str, tuple[bool, str | None, str | None]] = {}
            page.keyboard.press("Enter")  # start reviewing: claims the most urgent matching post
            page.wait_for_url("**/post/**")
            page.locator("#label-form").wait_for()
            if shots:
                save(page, shots, "post")

            # 1: safe
            first = current_post(page)
            page.keyboard.press("s")
            labelled[first] = (False, None, None)
            wait_for_other_post(page, first)
            # 2: unsafe in a taxonomy category, picked by typing into the category picker
            second = current_post(page)
            page.keyboard.press("c")
            page.keyboard.type("C10S2")
            assert page.locator("#category").input_value() == "C10S2"
            page.keyboard.press("Enter")
            labelled[second] = (True, "C10S2", None)
            wait_for_other_post(page, second)
            # 3: unsafe, a risk outside the taxonomy described in words
            third = current_post(page)
            page.keyboard.press("d")
            page.keyboard.type("Staged accident prank")
            page.keyboard.press("Enter")
            labelled[third] = (True, None, "Staged accident prank")
            page.wait_for_url(re.compile(r"msg=queue\+is\+clear"))
            assert "queue is clear" in page.content()
            assert set(labelled) == image_posts

            # the other pages, in the same browser session (and their screenshots for the README)
            for path, expect, name in (
                ("/clusters", "Blackout Challenge", "clusters"),
                ("/audits", "audit-before-retrain", "audits"),
                ("/audits/audit-before-retrain", "Flip matrix", "audit"),
            ):
                response = page.goto(f"{server.url}{path}")
                assert response is not None and response.status == 200, path
                assert expect in page.content(), path
                if shots:
                    save(page, shots, name)
            browser.close()
        assert server.ingester is not None and server.ingester.alive, "the ingester thread died"
    finally:
        t_stop = time.monotonic()
        server.stop()
        print(f"console stopped in {time.monotonic() - t_stop:.1f}s")

    # --- exactly those three labels on the reviews topic, as `guardstream review` writes them
    reviews = [ReviewEvent.model_validate_json(v) for v in read_topic(cs.bootstrap_servers, cs.reviews_topic)]
    assert sorted((r.post_id, r.unsafe, r.category, r.novel_risk, r.reviewer_id) for r in reviews) == sorted(
        (pid, *lab, "alice") for pid, lab in labelled.items()
    )

    # --- and into the next training export, as human labels (the images had no model label at all)
    exp = TrainingExporter(
        cs.bootstrap_servers,
        PromptSet(Taxonomy.load()),
        build_fetcher(cs),
        posts_topic=cs.posts_topic,
        verdicts_topic=cs.verdicts_topic,
        reviews_topic=cs.reviews_topic,
    )
    exp.export(tmp_path, ratios=parse_ratios("text=0,image=1,text-image=0"), val_fraction=0.0)
    exp.close()
    records = [
        json.loads(line)["extra_info"]
        for split in ("train", "validation")
        if (tmp_path / f"{split}.jsonl").exists()
        for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()
    ]
    got = {
        r["post_id"]: (r["query_label"], r["category"], r["original_category"], r["label_source"])
        for r in records
    }
    tax = Taxonomy.load()
    c10s2 = tax.subcategory_name("C10S2")
    assert got == {
        first: ("safe", "", "", "human"),
        second: ("unsafe", "C10S2", c10s2, "human"),
        third: ("unsafe", "", "Staged accident prank", "human"),
    }
    print(f"browser test: 3 labels → reviews topic → export in {time.monotonic() - t0:.1f}s")


def current_post(page: Any) -> str:
    from urllib.parse import unquote, urlparse

    return unquote(urlparse(page.url).path.removeprefix("/post/"))


def wait_for_other_post(page: Any, previous: str) -> None:
    page.wait_for_function(
        "prev => !decodeURIComponent(location.pathname).endsWith('/' + prev)", arg=previous, timeout=15_000
    )
    page.locator("#label-form").wait_for()


def save(page: Any, folder: str, name: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=False)
