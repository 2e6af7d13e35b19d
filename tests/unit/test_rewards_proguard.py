"""``training.rewards`` against ProGuard's ``compute_score`` (train/verl/utils/reward_score/safety_grm.py,
yushaohan/ProGuard @16dfafb), on the same similarities.

The expected column is what compute_score returns for each case, worked out by hand from that file:
+2 (image) or +1 for the request label, +1 for the response label (not image), an early return when
the ground truth or the answer is safe/safe, then +1/+0.5 for a taxonomy id, or for a held-out
(out-of-taxonomy) category 0 for an id and 0.5 + max((max_sim-0.7)/0.3, (mean_sim-0.6)/0.4)·0.5 (when
positive) for a description, without the similarity calls when the category name is empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from training.rewards import MINILM_FLOORS, PROGUARD_FLOORS, make_reward_funcs, total_reward

SIMS = {"Dangerous Social Media Challenge": [0.9, 0.3, 0.4], "Risky Stunt Videos": [0.72, 0.7, 0.66]}


def sim(text: str, refs: Sequence[str]) -> list[float]:
    out = SIMS[text]
    assert len(out) == len(refs)
    return list(out)


def ans(req: str, cat: str, resp: str | None = "safe") -> str:
    lines = [f"Request:{req}", *([f"Response:{resp}"] if resp else []), f"Category:{cat}"]
    return "<thinking>\nr\n</thinking>\n<answer>\n" + "\n".join(lines) + "\n</answer>"


def info(
    modality: str = "text", q: str = "unsafe", cat: str = "C9S1", name: str = "Self-Harm and Suicide"
) -> dict[str, object]:
    syn = ["Harmful Online Challenge Trend", "Risky Social Media Dare"] if cat == "" and name else []
    return {
        "modality": modality,
        "query_label": q,
        "response_label": "safe",
        "category": cat,
        "original_category": name,
        "synonymous_phrase": syn,
    }


OOD = {"cat": "", "name": "Dangerous Viral Challenge"}
# (completion, extra_info, compute_score's value)
CASES = [
    (ans("unsafe", "C9S1"), info(), 3.0),
    (ans("unsafe", "C9S2"), info(), 2.5),
    (ans("unsafe", "Some Guess"), info(), 2.0),
    (ans("safe", "None"), info(), 1.0),
    (ans("unsafe", "C1S1"), info(q="safe", cat="", name=""), 1.0),
    (ans("safe", "None"), info(q="safe", cat="", name=""), 2.0),
    (ans("safe", "C4S1", resp="unsafe"), info(), 0.5),
    # the measured mismatch: 2.833 with ProGuard's floors, 2.900 with the MiniLM floors
    (ans("unsafe", "Dangerous Social Media Challenge"), info(**OOD), 2.0 + 0.5 + (0.9 - 0.7) / 0.3 * 0.5),
    # here the mean branch wins: max 0.72 → 0.033, mean 0.6933 → 0.1167
    (
        ans("unsafe", "Risky Stunt Videos"),
        info(**OOD),
        2.0 + 0.5 + ((0.72 + 0.7 + 0.66) / 3 - 0.6) / 0.4 * 0.5,
    ),
    (ans("unsafe", "C9S1"), info(**OOD), 2.0),
    (ans("safe", "None"), info(**OOD), 1.0),
    (ans("unsafe", "Some Risk"), info(cat="", name=""), 2.5),
    (ans("unsafe", "C10S2", resp=None), info("image", cat="C10S2", name="x"), 3.0),
    (ans("unsafe", "C10S1", resp=None), info("image", cat="C10S2", name="x"), 2.5),
    (ans("safe", "None", resp=None), info("image", q="safe", cat="", name=""), 2.0),
    (ans("unsafe", "Dangerous Social Media Challenge", resp=None), info("image", **OOD), 2.0 + 0.5 + 1 / 3),
    (ans("unsafe", "C4", resp=None), info("image", **OOD), 2.0),
    (ans("unsafe", "C4"), info("text-image", cat="C4", name="x"), 3.0),
    (ans("unsafe", "C4S1"), info("text-image", cat="C4", name="x"), 2.5),
    ("Request:unsafe\nCategory:C9S1", info(), 0.0),
    (ans("unsafe", "None"), info(), 0.0),
]
# the deliberate difference: a missed OOD image scores 0.5 in ProGuard, 0 here (see total_reward)
QUIRK = (ans("safe", "None", resp=None), info("image", **OOD), 0.5)


@pytest.mark.parametrize(("completion", "extra", "expected"), [*CASES, QUIRK])
def test_proguard_floors_reproduce_compute_score(
    completion: str, extra: dict[str, object], expected: float
) -> None:
    got = total_reward(
        [completion], [extra], similarity=sim, floors=PROGUARD_FLOORS, proguard_image_quirk=True
    )
    assert got == [pytest.approx(expected)]


def test_the_deliberate_difference_is_the_missed_ood_image_only() -> None:
    comps, extras = [c for c, _, _ in CASES], [e for _, e, _ in CASES]
    assert total_reward(comps, extras, similarity=sim, floors=PROGUARD_FLOORS) == [
        pytest.approx(x) for _, _, x in CASES
    ]
    assert total_reward([QUIRK[0]], [QUIRK[1]], similarity=sim, floors=PROGUARD_FLOORS) == [0.0]


def test_floors_change_the_score_and_are_bound_for_trl() -> None:
    c, e = ans("unsafe", "Dangerous Social Media Challenge"), info(**OOD)
    assert total_reward([c], [e], similarity=sim, floors=PROGUARD_FLOORS) == [
        pytest.approx(2.0 + 0.5 + 1 / 3)
    ]
    assert total_reward([c], [e], similarity=sim, floors=MINILM_FLOORS) == [pytest.approx(2.9)]
    funcs = make_reward_funcs(PROGUARD_FLOORS, similarity=sim)
    assert [f.__name__ for f in funcs] == [
        "format_reward",
        "binary_reward",
        "category_reward",
        "ood_similarity_reward",
    ]
    # TRL calls reward functions with the dataset columns and its own keyword arguments
    assert sum(f(completions=[c], extra_info=[e], prompts=["p"], trainer_state=None)[0] for f in funcs) == (
        pytest.approx(1.0 + 2.0 + 0.5 + 1 / 3)
    )
    minilm = make_reward_funcs(MINILM_FLOORS, similarity=sim)[3]
    assert minilm(completions=[c], extra_info=[e])[0] == pytest.approx(0.9)
