"""The default CPU engine runs the real MiniLM weights and the shipped head. Sentences here are not in its
training data (cpu_exemplars.yaml, cpu_train_templates.yaml)."""

from __future__ import annotations

from guard.engines.cpu.engine import CpuEngine, CpuEngineConfig
from guard.prompts import PromptSet
from guard.samples import drawn_image
from guard.types import ModerationItem

SAFE = [
    "Anyone know a good pizza place downtown?",
    "Proud of my daughter for finishing her first marathon",
    "What time does the museum open on Sunday?",
    "Great workout at the gym this morning",
]
UNSAFE = [
    ("Selling unregistered handguns and ammo, no questions asked, DM me", {"C6", "C8"}),
    ("Buy cocaine and MDMA here, fast discreet shipping", {"C8"}),
    ("I want to kill myself, nothing matters anymore, tonight is the night", {"C9"}),
    ("Click this link to claim your free prize, just enter your bank password", {"C3", "C6"}),
    ("Step by step guide to make ransomware that encrypts hospital files", {"C4"}),
]


def test_separates_clear_cases(cpu_engine: CpuEngine) -> None:
    items = [ModerationItem(f"s{i}", t) for i, t in enumerate(SAFE)]
    items += [ModerationItem(f"u{i}", t) for i, (t, _) in enumerate(UNSAFE)]
    verdicts = cpu_engine.moderate(items)
    for v, t in zip(verdicts[: len(SAFE)], SAFE, strict=True):
        assert v.safe is True, t
        assert v.p_unsafe is not None and v.p_unsafe < 0.5
    for v, (t, cats) in zip(verdicts[len(SAFE) :], UNSAFE, strict=True):
        assert v.safe is False, t
        assert v.category in cats, (t, v.category)
        assert v.subcategory is not None and v.subcategory.startswith(v.category + "S")
        assert v.p_unsafe is not None and v.p_unsafe >= 0.5


def test_batch_order_and_batching_do_not_change_verdicts(cpu_engine: CpuEngine) -> None:
    texts = SAFE + [t for t, _ in UNSAFE]
    batch = cpu_engine.moderate([ModerationItem(str(i), t) for i, t in enumerate(texts)])
    single = [cpu_engine.moderate([ModerationItem("x", t)])[0] for t in reversed(texts)][::-1]
    assert [(v.safe, v.subcategory) for v in batch] == [(v.safe, v.subcategory) for v in single]
    for a, b in zip(batch, single, strict=True):
        assert abs((a.p_unsafe or 0) - (b.p_unsafe or 0)) < 1e-3


def test_images_are_not_judged_and_say_so(cpu_engine: CpuEngine) -> None:
    img = drawn_image(1)
    only_image, with_text = cpu_engine.moderate(
        [
            ModerationItem("i", None, (img,)),
            ModerationItem("t", "Buy cocaine and MDMA here, fast discreet shipping", (img,)),
        ]
    )
    assert only_image.safe is None and only_image.abstained_reason
    assert (
        with_text.safe is False and with_text.abstained_reason and "text only" in with_text.abstained_reason
    )


def test_threshold_is_respected(prompts: PromptSet, cpu_engine: CpuEngine) -> None:
    strict = CpuEngine(prompts, CpuEngineConfig(threshold=0.999999), embedder=cpu_engine._emb)
    item = ModerationItem("x", "Just baked cookies with grandma, recipe in the comments")
    assert strict.moderate([item])[0].safe is True
    lax = CpuEngine(prompts, CpuEngineConfig(threshold=0.0), embedder=cpu_engine._emb)
    assert lax.moderate([item])[0].safe is False


def test_out_of_taxonomy_harm_becomes_a_novel_risk(cpu_engine: CpuEngine) -> None:
    from workers.demo.sample_feed import BURST_TEXTS

    verdicts = cpu_engine.moderate([ModerationItem(str(i), t) for i, t in enumerate(BURST_TEXTS)])
    novel = [(v, t) for v, t in zip(verdicts, BURST_TEXTS, strict=True) if v.safe is False and v.novel_risk]
    assert len(novel) >= len(BURST_TEXTS) - 1  # unsafe, and no subcategory fits the new "challenge" trend
    leading = 0
    for v, t in novel:
        assert v.category is None and v.novel_risk
        # a short phrase taken from the post: something alerts can cluster on
        assert len(v.novel_risk.split()) <= 3 and v.novel_risk in t.lower()
        leading += t.lower().startswith(v.novel_risk)
    assert leading <= 2  # the salient phrase, not (as the prototype engine gave) the post's first words
