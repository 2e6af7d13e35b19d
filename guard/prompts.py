"""ProGuard's inference prompts, as data files rendered with the configured taxonomy.

The templates in ``guard/data/prompts/`` are ProGuard's ``deploy/prompts.py`` (yushaohan/ProGuard):
``TEXT_SYSTEM_PROMPT``, ``TEXT_IMAGE_SYSTEM_PROMPT``, ``IMAGE_SYSTEM_PROMPT`` with the
``UNSAFE_CONTENT_CATEGORIES`` block replaced by a placeholder, and the three user templates
(``{{HUMAN_USER}}`` / ``{{AI_ASSISTANT}}``). Message construction follows ``deploy/inference.py``:
a system message, then one user message whose content is the image(s) first, then the text part
(" " when an image comes with no text). Posts are user content, so the post text is ``HUMAN_USER``
and ``AI_ASSISTANT`` is empty, as inference.py does when no AI response is given.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from guard.taxonomy import DATA_DIR, Taxonomy
from schemas.events import Modality

PROMPT_DIR = DATA_DIR / "prompts"
PLACEHOLDER = "<<UNSAFE_CONTENT_CATEGORIES>>"
_SLOT = re.compile(r"\{\{HUMAN_USER\}\}|\{\{AI_ASSISTANT\}\}")
_FILES = {Modality.TEXT: "text", Modality.TEXT_IMAGE: "text_image", Modality.IMAGE: "image"}


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    modality: Modality
    system: str
    user: str
    n_images: int


class PromptSet:
    """Rendered system prompts (one per modality) plus the policy version they define."""

    def __init__(self, taxonomy: Taxonomy, prompt_dir: Path = PROMPT_DIR) -> None:
        self.taxonomy = taxonomy
        self._system: dict[Modality, str] = {}
        self._user: dict[Modality, str] = {}
        block = taxonomy.render_categories()
        for modality, stem in _FILES.items():
            sys_t = (prompt_dir / f"{stem}_system.txt").read_text(encoding="utf-8")
            if sys_t.count(PLACEHOLDER) != 1:
                raise ValueError(f"{stem}_system.txt must contain {PLACEHOLDER} exactly once")
            self._system[modality] = sys_t.replace(PLACEHOLDER, block)
            self._user[modality] = (prompt_dir / f"{stem}_user.txt").read_text(encoding="utf-8")

    @cached_property
    def policy_version(self) -> str:
        """``<taxonomy name>-<sha256 of rendered prompts>``: changes whenever policy text changes."""
        h = hashlib.sha256()
        for m in _FILES:
            h.update(self._system[m].encode())
            h.update(b"\x00")
            h.update(self._user[m].encode())
            h.update(b"\x00")
        return f"{self.taxonomy.model.name}-{h.hexdigest()[:12]}"

    def system(self, modality: Modality) -> str:
        return self._system[modality]

    def render(self, modality: Modality, text: str | None, n_images: int) -> RenderedPrompt:
        user_request = "" if modality is Modality.IMAGE else (text or "")
        # One pass over the template: a post that itself contains "{{AI_ASSISTANT}}" is not re-expanded.
        values = {"{{HUMAN_USER}}": user_request, "{{AI_ASSISTANT}}": ""}
        user = _SLOT.sub(lambda m: values[m.group(0)], self._user[modality])
        return RenderedPrompt(modality, self._system[modality], user, n_images)
