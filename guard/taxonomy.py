"""The hierarchical safety taxonomy (policy-as-config) and the policy version derived from it."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TAXONOMY_PATH = DATA_DIR / "taxonomy.yaml"
_CAT_ID = re.compile(r"^C\d+$")
_SUB_ID = re.compile(r"^C\d+S\d+$")


class TaxonomyError(ValueError):
    """The taxonomy file is missing or malformed; raised at start-up with the file and the reason."""


class Subcategory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=_SUB_ID.pattern)
    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    synonyms: tuple[str, ...] = ()


class Category(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=_CAT_ID.pattern)
    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    synonyms: tuple[str, ...] = ()
    subcategories: tuple[Subcategory, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _sub_ids_belong(self) -> Category:
        for s in self.subcategories:
            if not s.id.startswith(self.id + "S"):
                raise ValueError(f"subcategory {s.id} does not belong to category {self.id}")
        return self


class TaxonomyModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    categories: tuple[Category, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> TaxonomyModel:
        seen: set[str] = set()
        for c in self.categories:
            for i in (c.id, *(s.id for s in c.subcategories)):
                if i in seen:
                    raise ValueError(f"duplicate taxonomy id {i}")
                seen.add(i)
        return self


@dataclass(frozen=True)
class Resolved:
    category: Category
    subcategory: Subcategory | None


class Taxonomy:
    """A validated taxonomy with id lookups and the exact prompt rendering ProGuard expects."""

    def __init__(self, model: TaxonomyModel, source_text: str) -> None:
        self.model = model
        self.source_text = source_text
        self._cats = {c.id: c for c in model.categories}
        self._subs = {s.id: (c, s) for c in model.categories for s in c.subcategories}

    @classmethod
    def load(cls, path: Path | str | None = None) -> Taxonomy:
        p = Path(path) if path else DEFAULT_TAXONOMY_PATH
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise TaxonomyError(f"cannot read taxonomy file {p}: {exc}") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TaxonomyError(f"taxonomy file {p} is not valid YAML: {exc}") from None
        try:
            model = TaxonomyModel.model_validate(doc)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise TaxonomyError(
                f"taxonomy file {p} is invalid at {loc or '<root>'}: {first['msg']}"
            ) from None
        return cls(model, text)

    @property
    def categories(self) -> tuple[Category, ...]:
        return self.model.categories

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.render_categories().encode("utf-8")).hexdigest()[:12]

    def render_categories(self) -> str:
        """The ``UNSAFE_CONTENT_CATEGORIES`` block, byte-identical to ProGuard's deploy/prompts.py."""
        lines = [""]
        for c in self.model.categories:
            lines.append(f"{c.id}: {c.name} — {c.description}")
            lines.extend(f"  {s.id}: {s.name} — {s.description}" for s in c.subcategories)
        return "\n".join(lines) + "\n"

    def resolve(self, code: str) -> Resolved | None:
        """Map ``C9S1`` or ``C9`` to taxonomy entries; ``None`` for anything not in the taxonomy."""
        code = code.strip().upper()
        if code in self._subs:
            c, s = self._subs[code]
            return Resolved(c, s)
        if code in self._cats:
            return Resolved(self._cats[code], None)
        return None

    def category_name(self, cid: str | None) -> str | None:
        return self._cats[cid].name if cid in self._cats else None

    def subcategory_name(self, sid: str | None) -> str | None:
        return self._subs[sid][1].name if sid in self._subs else None


def looks_like_taxonomy_code(text: str) -> bool:
    t = text.strip().upper()
    return bool(_CAT_ID.match(t) or _SUB_ID.match(t))
