"""The retraining loop: reviews, dataset export from real topics, rewards, launcher dry run."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Producer

from guard.engines.cpu.engine import CpuEngine
from guard.prompts import PromptSet
from guard.samples import drawn_image, png_bytes
from infra.stack import create_topics
from schemas.events import ReviewEvent
from tests.conftest import BUCKET, Services
from training import launch
from training.export import TrainingExporter, balance, parse_ratios
from training.rewards import (
    binary_reward,
    category_reward,
    format_reward,
    ood_similarity_reward,
    total_reward,
)
from training.synonyms import SynonymBank
from workers.demo.sample_feed import post
from workers.settings import Settings
from workers.wiring import build_moderator, build_worker

THINK = "<think>\nreasoning\n</think>\n"


def ans(req: str, cat: str, resp: str | None = "safe", tag: str = "think") -> str:
    lines = [f"Request:{req}", *([f"Response:{resp}"] if resp else []), f"Category:{cat}"]
    return f"<{tag}>\nr\n</{tag}>\n<answer>\n" + "\n".join(lines) + "\n</answer>"


def info(
    modality: str = "text",
    q: str = "unsafe",
    cat: str = "C9S1",
    name: str = "Self-Harm and Suicide",
    syn: list[str] | None = None,
) -> dict[str, object]:
    return {
        "modality": modality,
        "query_label": q,
        "response_label": "safe",
        "category": cat,
        "original_category": name,
        "synonymous_phrase": syn or [],
    }


def test_reward_orderings_in_taxonomy() -> None:
    e = info()
    comps = [
        ans("unsafe", "C9S1"),
        ans("unsafe", "C9S2"),
        ans("unsafe", "Some Guess"),
        ans("safe", "None"),
        "Request:unsafe Category:C9S1",
        ans("unsafe", "C9S1", tag="thinking"),
    ]
    tot = total_reward(comps, [e] * len(comps))
    assert tot[0] == 3.0 and tot[5] == 3.0  # binary 2 + exact category 1; both tag spellings
    assert tot[0] > tot[1] == 2.5 > tot[2] == 2.0 > tot[3] == 1.0 > tot[4] == 0.0
    assert format_reward(comps, [e] * 6) == [1, 1, 1, 1, 0, 1]
    assert category_reward(comps[:3], [e] * 3) == [1.0, 0.5, 0.0]
    # Category:None must go with a safe label, and vice versa
    assert format_reward([ans("unsafe", "None"), ans("safe", "C1S1")], [e, e]) == [0, 0]


def test_reward_image_modality_and_safe_ground_truth() -> None:
    img = info("image", q="safe", cat="", name="")
    assert binary_reward([ans("safe", "None", resp=None)], [img]) == [2.0]
    assert format_reward([ans("safe", "None")], [img]) == [0.0]  # image answers have no Response line
    assert total_reward([ans("unsafe", "C1S1", resp=None)], [img]) == [0.0 + 0.0]


def test_ood_similarity_reward_prefers_near_synonyms() -> None:
    e = info(
        cat="",
        name="Dangerous Viral Challenge",
        syn=["Harmful Online Challenge Trend", "Risky Social Media Dare", "Viral Stunt Causing Injury"],
    )
    comps = [
        ans("unsafe", "Dangerous Social Media Challenge"),
        ans("unsafe", "Copyright Metadata Tampering"),
        ans("unsafe", "C9S1"),
    ]
    ood = ood_similarity_reward(comps, [e] * 3)
    assert ood[0] > ood[1] >= 0.5 and ood[2] == 0.0
    assert total_reward(comps, [e] * 3)[0] == pytest.approx(2.0 + ood[0])


def test_synonym_bank_grows(prompts: PromptSet, tmp_path: Path) -> None:
    bank = SynonymBank.from_taxonomy(prompts.taxonomy)
    assert "Personal Data Exposure" in bank.synonyms("Private Data Leakage")
    bank.add_cluster(
        "Blackout Challenge", ["breath holding challenge", "pass-out game", "breath holding challenge"]
    )
    bank.add_review("choking game videos", "Blackout Challenge")
    assert bank.synonyms("Blackout Challenge") == [
        "breath holding challenge",
        "pass-out game",
        "choking game videos",
    ]
    bank.save(tmp_path / "b.json")
    assert SynonymBank.load(tmp_path / "b.json").entries == bank.entries


def test_balance_and_ratios() -> None:
    assert parse_ratios("2:1:1") == {"text": 0.5, "image": 0.25, "text-image": 0.25}
    assert parse_ratios("text=1,image=1") == {"text": 0.5, "image": 0.5, "text-image": 0.0}
    with pytest.raises(ValueError):
        parse_ratios("1:-1:1")
    groups = {"text": list(range(50)), "image": list(range(7)), "text-image": list(range(12))}
    got = balance(groups, parse_ratios("2:1:1"), random.Random(0))
    assert {k: len(v) for k, v in got.items()} == {"text": 14, "image": 7, "text-image": 7}


@pytest.mark.integration
def test_export_from_real_topics(
    kafka_settings: Settings, services: Services, cpu_engine: CpuEngine, prompts: PromptSet, tmp_path: Path
) -> None:
    reviews_topic = kafka_settings.posts_topic + "-reviews"
    create_topics(kafka_settings.bootstrap_servers, {reviews_topic: 1})
    s3 = services.s3_client()
    t0 = datetime(2026, 5, 1, tzinfo=UTC)
    values = []
    safe_texts = [
        "Morning run by the river",
        "Trying a new bread recipe today",
        "Our kid lost a first tooth",
        "Sunset over the harbour",
        "Board game night with friends",
        "New bike, first ride",
    ]
    for i, t in enumerate(safe_texts):
        values.append(post(f"t{i}", "u1", t, at=t0 + timedelta(minutes=i)))
    values.append(post("t-repost", "u2", safe_texts[0], at=t0 + timedelta(minutes=30)))  # duplicate content
    values.append(
        post(
            "t-drugs", "u3", "Buy cocaine and MDMA here, fast discreet shipping", at=t0 + timedelta(minutes=7)
        )
    )
    for i in range(4):
        key = f"train/{uuid.uuid4().hex}.png"
        s3.put_object(Bucket=BUCKET, Key=key, Body=png_bytes(drawn_image(40 + i)))
        values.append(post(f"i{i}", "u4", None, [f"s3://{BUCKET}/{key}"], at=t0 + timedelta(minutes=10 + i)))
        key2 = f"train/{uuid.uuid4().hex}.png"
        s3.put_object(Bucket=BUCKET, Key=key2, Body=png_bytes(drawn_image(60 + i)))
        values.append(
            post(
                f"c{i}",
                "u5",
                f"look at picture {i}",
                [f"s3://{BUCKET}/{key2}"],
                at=t0 + timedelta(minutes=20 + i),
            )
        )
    p = Producer({"bootstrap.servers": kafka_settings.bootstrap_servers})
    for v in values:
        p.produce(kafka_settings.posts_topic, v)
    assert p.flush(10) == 0
    build_worker(kafka_settings, cpu_engine).run(until_drained=True)

    # reviewers label the images the CPU engine could not judge, and override one model label
    reviews = [
        ReviewEvent(post_id=f"i{i}", unsafe=i == 0, category="C10S2" if i == 0 else None, reviewer_id="r1")
        for i in range(4)
    ]
    reviews.append(ReviewEvent(post_id="t3", unsafe=True, category="C9S1", reviewer_id="r2"))
    reviews.append(
        ReviewEvent(post_id="t4", unsafe=True, novel_risk="Dangerous Viral Challenge", reviewer_id="r2")
    )
    for r in reviews:
        p.produce(reviews_topic, r.model_dump_json().encode(), r.post_id.encode())
    assert p.flush(10) == 0

    moderator = build_moderator(kafka_settings, cpu_engine)
    exp = TrainingExporter(
        kafka_settings.bootstrap_servers,
        prompts,
        moderator.fetcher,
        posts_topic=kafka_settings.posts_topic,
        verdicts_topic=kafka_settings.verdicts_topic,
        reviews_topic=reviews_topic,
    )
    out = tmp_path / "export"
    rep = exp.export(out, ratios=parse_ratios("1:1:1"), val_fraction=0.25)
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]
    recs = train + val
    by_id = {r["extra_info"]["post_id"]: r["extra_info"] for r in recs}

    assert rep.duplicates == 1 and rep.available == {"text": 7, "image": 4, "text-image": 4}
    assert rep.selected == {"text": 4, "image": 4, "text-image": 4}  # balanced 1:1:1
    hashes = [r["extra_info"]["content_hash"] for r in recs]
    assert len(hashes) == len(set(hashes)), "duplicate content in the export"
    assert max(r["extra_info"]["created_at"] for r in train) <= min(
        r["extra_info"]["created_at"] for r in val
    )
    assert (len(train), len(val)) == (9, 3)
    for i in range(4):  # images were only labeled by humans
        assert by_id[f"i{i}"]["label_source"] == "human"
    assert by_id["i0"] | {} and by_id["i0"]["category"] == "C10S2" and by_id["i0"]["query_label"] == "unsafe"
    text_only = tmp_path / "text-only"
    rep2 = exp.export(text_only, ratios=parse_ratios("text=1"), val_fraction=0.0)
    assert rep2.selected == {"text": 7} and rep2.label_sources == {"model": 5, "human": 2}
    texts = {
        r["extra_info"]["post_id"]: r["extra_info"]
        for r in map(json.loads, (text_only / "train.jsonl").read_text().splitlines())
    }
    # the model said safe; the reviewer's labels win
    assert (texts["t3"]["query_label"], texts["t3"]["category"], texts["t3"]["label_source"]) == (
        "unsafe",
        "C9S1",
        "human",
    )
    assert (texts["t4"]["category"], texts["t4"]["original_category"]) == ("", "Dangerous Viral Challenge")
    assert texts["t-drugs"]["query_label"] == "unsafe" and texts["t-drugs"]["label_source"] == "model"
    assert texts["t0"]["query_label"] == "safe" and "t-repost" not in texts
    for r in recs:  # TRL layout: TRL inserts the image parts itself; images are absolute paths
        assert "<image>" not in r["prompt"][1]["content"]
        for img in r["images"]:
            assert Path(img).is_absolute() and Path(img).is_file() and Path(img).parent == out / "images"
        if r["extra_info"]["modality"] == "text-image" and r["extra_info"]["category"]:
            assert "S" not in r["extra_info"]["category"]  # the text-image prompt asks for C*
    card = json.loads((out / "card.json").read_text())
    assert card["splits"] == {"train": 9, "validation": 3} and card["duplicates_removed"] == 1
    assert (out / "README.md").read_text().startswith("# guardstream training export")

    assert launch.main(["--dataset-dir", str(out), "--dry-run"]) == 0
