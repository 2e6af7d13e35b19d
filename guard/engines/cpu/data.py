"""The CPU head's training set, written by the project: templates x slot fillers, expanded deterministically.

``guard/data/cpu_train_templates.yaml`` holds hand-written templates for every ProGuard subcategory:
``pos`` (harmful intent) and ``neg`` (hard negatives: the same topic, benign intent), plus everyday posts
and ``novel`` harm that fits no subcategory (unsafe with no subcategory: viral dares and stunts).
``build_dataset()`` fills the slots and varies the register (case, punctuation, fillers, a typo, a
neutral lead-in sentence) with a seeded RNG per template, so the same seed gives byte-identical rows on
any machine (``digest()`` is what the reproducibility test and the head's metadata pin).

The split is by template, never by row: a template's every expansion lands in one split, so a held-out
sentence never shares its wording pattern with a training sentence (``train``/``calib``/``test``;
``calib`` fits the calibration of ``p_unsafe``, ``test`` is what the report measures).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from guard.taxonomy import DATA_DIR

TEMPLATES_PATH = DATA_DIR / "cpu_train_templates.yaml"
EXEMPLARS_PATH = DATA_DIR / "cpu_exemplars.yaml"
Split = Literal["train", "calib", "test"]
Kind = Literal["pos", "novel", "hard", "everyday"]
_SLOT = re.compile(r"\{(\w+)\}")

# Register variation. Lead-ins are neutral sentences put before a post so the head learns that intent,
# not the surrounding chatter, decides (and so a window of a long post looks like training data).
_LEADS = (
    "ok so.",
    "long day.",
    "not sure where else to post this.",
    "quick question.",
    "so yeah.",
    "posting this from my phone, sorry for typos.",
    "new here.",
    "been thinking about this all week.",
    "my friend told me about this.",
    "real talk.",
    "work was busy today and the bus was late again.",
    "we had pizza for lunch and watched the game after.",
    "my sister is visiting this week, it has been nice.",
    "the weather finally turned warm, so I walked to the park.",
    "I have been reading a lot lately, mostly mysteries.",
    "coffee first, then everything else.",
    "the kids had a school trip to the zoo and came back exhausted and happy.",
    "we spent the afternoon fixing the fence and painting the shed green.",
    "I tried a new bakery this morning and the croissants were amazing.",
    "my phone battery died halfway through the day, of course.",
)
_PREFIXES = ("ngl ", "honestly ", "lol ", "pls ", "guys ", "hey, ", "umm ", "fr ")
_SUFFIXES = (" lol", " !!", " tbh", " ...", " haha", " asap", " 🙃", " thanks")


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    unsafe: bool
    sub: str | None  # taxonomy subcategory id of a positive; None for negatives and novel harm
    kind: Kind
    topic: str  # the subcategory whose topic the row is about ("everyday" for everyday posts)
    group: str  # the template the row came from: the unit of the split
    split: Split


def _split_of(i: int) -> Split:
    # Template position within its list: 2, 7, ... are held out for the report, 4, 9, ... calibrate.
    return "test" if i % 5 == 2 else "calib" if i % 5 == 4 else "train"


def _typo(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    long = [k for k, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not long:
        return text
    k = rng.choice(long)
    w = words[k]
    j = rng.randrange(1, len(w) - 2)
    words[k] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def _vary(rng: random.Random, text: str) -> str:
    """One register variation (or none): how people actually type differs far more than templates do."""
    r = rng.random()
    if r < 0.15:
        text = text.lower()
    elif r < 0.25:
        text = re.sub(r"[,.!?']", "", text)
    elif r < 0.35:
        text = text[:1].upper() + text[1:] + ("" if text.endswith(("?", "!", ".")) else ".")
    if rng.random() < 0.2:
        text = rng.choice(_PREFIXES) + text
    if rng.random() < 0.2:
        text = text + rng.choice(_SUFFIXES)
    if rng.random() < 0.15:
        text = _typo(rng, text)
    if rng.random() < 0.3:
        # Neutral sentences first: a window of a long post looks like this, and the head must learn that
        # harmless chatter around a harmful sentence does not make it harmless (nor a benign one harmful).
        text = " ".join(rng.sample(_LEADS, rng.choice((1, 1, 2, 3)))) + " " + text
    return text


def _fill(rng: random.Random, template: str, slots: dict[str, list[str]]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in slots:
            raise KeyError(
                f"template {template!r} uses slot {{{name}}} missing from 'slots' in {TEMPLATES_PATH}"
            )
        return str(rng.choice(slots[name]))

    return _SLOT.sub(one, template)


@lru_cache(maxsize=4)
def build_dataset(seed: int = 0, fills: int = 14, path: Path = TEMPLATES_PATH) -> tuple[Example, ...]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    slots: dict[str, list[str]] = {k: [str(x) for x in v] for k, v in doc["slots"].items()}
    rows: list[Example] = []
    seen: set[str] = set()

    def expand(template: str, group: str, split: Split, sub: str | None, kind: Kind, topic: str) -> None:
        # A string seed is hashed with SHA-512 by `random`, so this is stable across processes and machines.
        rng = random.Random(f"{seed}|{group}")
        for _ in range(fills):
            text = _vary(rng, _fill(rng, template, slots))
            if text in seen:
                continue
            seen.add(text)
            rows.append(Example(text, kind in ("pos", "novel"), sub, kind, topic, group, split))

    for sub, lists in doc["templates"].items():
        for i, t in enumerate(lists["pos"]):
            expand(t, f"{sub}/pos/{i}", _split_of(i), sub, "pos", sub)
        for i, t in enumerate(lists["neg"]):
            expand(t, f"{sub}/neg/{i}", _split_of(i), None, "hard", sub)
    for i, t in enumerate(doc["everyday"]):
        expand(t, f"everyday/{i}", _split_of(i), None, "everyday", "everyday")
    # Harm that fits no subcategory: unsafe, no subcategory (the head is taught an even spread over all).
    for i, t in enumerate(doc.get("novel", [])):
        expand(t, f"novel/{i}", _split_of(i), None, "novel", "novel")
    # The prototype baseline's own hand-written examples (cpu_exemplars.yaml) train the head too: never
    # held out, so the report does not measure the head on the prototypes' sentences.
    ex: dict[str, Any] = yaml.safe_load(EXEMPLARS_PATH.read_text(encoding="utf-8"))
    for sub, texts in ex["unsafe"].items():
        for i, t in enumerate(texts):
            expand(t, f"exemplars/{sub}/{i}", "train", sub, "pos", sub)
    for i, t in enumerate(ex["safe"]):
        expand(t, f"exemplars/safe/{i}", "train", None, "everyday", "everyday")
    return tuple(rows)


def digest(rows: tuple[Example, ...]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.text}\t{r.unsafe}\t{r.sub}\t{r.kind}\t{r.group}\t{r.split}\n".encode())
    return h.hexdigest()[:16]


def subcategory_ids(path: Path = TEMPLATES_PATH) -> list[str]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return list(doc["templates"])
