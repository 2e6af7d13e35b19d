"""The synonym bank behind ProGuard's OOD-description reward.

ProGuard rewards a generated description of an unseen (held-out) category by its embedding similarity
to the category's name and synonymous phrases (taxonomy.yaml ``synonymous-phrase``;
train/verl/utils/reward_score/safety_grm.py). The bank starts from the taxonomy and grows from emerging-
risk clusters (a cluster's member descriptions become synonyms of a new candidate category) and from
reviewer corrections.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from guard.taxonomy import Taxonomy


class SynonymBank:
    def __init__(self, entries: dict[str, list[str]] | None = None) -> None:
        self.entries: dict[str, list[str]] = {k: list(v) for k, v in (entries or {}).items()}

    @classmethod
    def from_taxonomy(cls, taxonomy: Taxonomy) -> SynonymBank:
        bank = cls()
        for c in taxonomy.categories:
            bank.add(c.name, c.synonyms)
            for s in c.subcategories:
                bank.add(s.name, s.synonyms)
        return bank

    def add(self, name: str, phrases: Iterable[str]) -> None:
        cur = self.entries.setdefault(name, [])
        seen = {p.lower() for p in cur} | {name.lower()}
        for p in phrases:
            p = " ".join(p.split())
            if p and p.lower() not in seen:
                cur.append(p)
                seen.add(p.lower())

    def add_cluster(self, label: str, member_descriptions: Iterable[str]) -> None:
        """An emerging-risk cluster becomes a candidate category whose synonyms are its members."""
        self.add(label, member_descriptions)

    def add_review(self, description: str, category_name: str | None = None) -> None:
        """A reviewer's corrected novel-risk description: a synonym of the named category, or a new one."""
        self.add(category_name or description, [description])

    def synonyms(self, name: str) -> list[str]:
        return list(self.entries.get(name, []))

    def save(self, path: Path) -> None:
        path.write_text(
            json.dumps(self.entries, indent=2, sort_keys=True, ensure_ascii=False), encoding="utf-8"
        )

    @classmethod
    def load(cls, path: Path) -> SynonymBank:
        return cls(json.loads(path.read_text(encoding="utf-8")))
