"""The CPU engine's trained head: held-out quality vs the prototype baseline, long posts, calibration,
the dataset generator and the novel-risk phrase. Sentences written here are not in the training data."""

from __future__ import annotations

import numpy as np
import pytest

from guard.engines.cpu.data import build_dataset, digest
from guard.engines.cpu.engine import CpuEngine
from guard.engines.cpu.head import HEAD_PATH, MAX_WINDOWS, CpuHead, windows
from guard.engines.cpu.metrics import average_precision, isotonic_fit
from guard.engines.cpu.novel import candidates, salient_phrase
from guard.engines.cpu.report import report
from guard.taxonomy import Taxonomy
from guard.types import ModerationItem

HARMLESS = [
    "We drove up to the lake on Saturday morning.",
    "The kids wanted pancakes so we stopped at the diner first.",
    "It rained for an hour and then the sun came out.",
    "My brother brought his new kayak and tipped it over twice.",
    "Grandpa told the same fishing story he tells every summer.",
    "We grilled corn and burgers for lunch by the water.",
    "Someone had a speaker playing old songs all afternoon.",
    "The dog chased ducks until he was too tired to stand.",
    "I finished half of my novel on the porch.",
    "In the evening we played cards and lost to my aunt again.",
    "The stars out there are so much brighter than in the city.",
    "We packed up slowly on Sunday because nobody wanted to leave.",
]
THREAT = (
    "And Mark, I know which house is yours, I will come at night and burn it down with your family inside."
)


def test_head_beats_the_prototype_on_held_out_templates(cpu_engine: CpuEngine) -> None:
    """Same run, same held-out rows (a slice of whole templates never trained or calibrated on)."""
    r = report(limit=240, embedder=cpu_engine._emb)
    head, proto = r["head"], r["prototype"]
    assert r["rows"] >= 200 and head["n_unsafe"] >= 60
    assert head["auprc"] > proto["auprc"] + 0.1, r
    assert head["hard_negative_fpr"] < proto["hard_negative_fpr"] - 0.2, r
    assert head["auprc"] > head["chance_auprc"] + 0.2
    assert head["everyday_fpr"] <= proto["everyday_fpr"], r  # was 0.14 vs 0.06 before the data rewrite
    assert head["novel_of_caught"] <= 0.15, r  # known-subcategory posts are rarely called novel (was 0.28)


def test_a_threat_after_twelve_harmless_sentences_is_caught(cpu_engine: CpuEngine) -> None:
    long_post = " ".join([*HARMLESS, THREAT])
    harmless_post = " ".join(HARMLESS)
    assert len(windows(long_post)) > 1
    threat, harmless = cpu_engine.moderate(
        [ModerationItem("t", long_post), ModerationItem("h", harmless_post)]
    )
    assert threat.safe is False, threat
    assert harmless.safe is True, harmless
    # Without windows the threat is diluted by mean pooling: the whole post in one embedding reads safe.
    whole = cpu_engine.head(cpu_engine._emb.encode([long_post]))
    assert float(whole.p_unsafe[0]) < threat.p_unsafe - 0.2  # type: ignore[operator]


def test_windows_are_bounded_overlapping_and_reach_the_end() -> None:
    assert windows("short post here") == ["short post here"]
    words = [f"w{i}" for i in range(3000)]
    for n in (33, 60, 130, 300, 800, 1200, 3000):
        ws = windows(" ".join(words[:n]))
        assert 1 < len(ws) <= 2 * MAX_WINDOWS - 1
        assert all(len(w.split()) <= 180 for w in ws)
        assert ws[0].split()[0] == "w0" and ws[-1].split()[-1] == f"w{n - 1}"
        if n <= 1200:  # every word is in some window
            assert {w for x in ws for w in x.split()} == set(words[:n])
    sentences = [f"Sentence number {i} is here." for i in range(40)]
    ws = windows(" ".join(sentences))
    assert all(w.endswith(".") for w in ws)  # cut at sentence ends
    assert any(s in w for w in ws for s in ("number 39 is here.",))


def test_calibration_is_monotonic_and_bounded() -> None:
    head = CpuHead.load()
    assert np.all(np.diff(head.iso_x) > 0) and np.all(np.diff(head.iso_y) >= 0)
    grid = np.linspace(0.0, 1.0, 1001)
    p = head.calibrate(grid)
    assert np.all(np.diff(p) >= 0) and p.min() > 0 and p.max() < 1
    # The fit itself, on data where the truth is known: a violating pair is pooled to its mean.
    kx, ky = isotonic_fit(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.0, 1.0, 0.0, 1.0]))
    assert np.all(np.diff(ky) >= 0)
    assert np.interp(0.25, kx, ky) == pytest.approx(0.5)


def test_average_precision_orders_matter() -> None:
    y = np.array([True, False, True, False])
    assert average_precision(y, np.array([0.9, 0.1, 0.8, 0.2])) == pytest.approx(1.0)
    assert average_precision(y, np.array([0.1, 0.9, 0.2, 0.8])) < 0.6


def test_dataset_is_reproducible_and_split_by_template() -> None:
    a = build_dataset()
    build_dataset.cache_clear()
    b = build_dataset()
    assert a == b and digest(a) == digest(b)
    assert len(a) >= 12000
    split_of: dict[str, str] = {}
    for r in a:
        assert split_of.setdefault(r.group, r.split) == r.split, r.group  # a template lives in one split
    train = {r.text for r in a if r.split == "train"}
    assert not train & {r.text for r in a if r.split == "test"}
    subs = {s.id for c in Taxonomy.load().categories for s in c.subcategories}
    for split in ("train", "test"):
        assert {r.sub for r in a if r.unsafe and r.sub and r.split == split} == subs
        assert {r.topic for r in a if r.kind == "hard" and r.split == split} >= subs - {"C1S3"}
        assert any(r.kind == "novel" for r in a if r.split == split)  # harm that fits no subcategory
    n_pos = sum(r.unsafe for r in a)
    assert sum(r.kind == "hard" for r in a) >= 0.9 * n_pos  # about as many hard negatives as positives
    assert sum(r.kind == "everyday" for r in a) >= 0.4 * n_pos  # plus many everyday posts
    assert len({r.group for r in a if r.kind == "everyday" and not r.group.startswith("exemplars")}) >= 200


def test_training_data_avoids_public_probe_wording() -> None:
    """Technical homonyms and games are in the data, in the project's own words: no template mirrors the
    well-known probe phrasings ("how do I kill a python process", "what is suicide", ...)."""
    import re

    probes = re.compile(
        r"how (do|can|would) (i|you) kill (a|an|the|all|someone|somebody)\b|\bwhat is suicide\b"
        r"|most painless way to die|how do i plan a (kidnapping|robbery)"
    )
    texts = {r.group: r.text.lower() for r in build_dataset()}
    assert not [g for g, t in texts.items() if probes.search(t)]
    # The demo's planted trend (choking / fainting "challenges") is not in the novel-harm rows, so the
    # engine's test of it measures generalisation.
    novel = [r.text.lower() for r in build_dataset() if r.kind == "novel"]
    assert novel and not [t for t in novel if re.search(r"chok|faint|blackout|black out|pass out", t)]


def test_shipped_head_was_built_from_this_dataset() -> None:
    """Editing the templates without `python -m training.cpu_head` would ship stale weights."""
    z = np.load(HEAD_PATH, allow_pickle=False)
    assert str(z["meta_dataset"]) == digest(build_dataset())
    assert HEAD_PATH.stat().st_size < 1_000_000


def test_novel_risk_phrase_is_the_salient_noun_phrase(cpu_engine: CpuEngine) -> None:
    text = (
        "Saw on my feed that the fire ant dare is spreading, teens sit on the mound for a minute and film it"
    )
    assert "fire ant dare" in candidates(text)
    vec = cpu_engine._emb.encode([text])[0]
    phrase = salient_phrase(text, vec, cpu_engine._emb)
    assert 1 <= len(phrase.split()) <= 3 and phrase in text.lower()
    assert not text.lower().startswith(phrase)
