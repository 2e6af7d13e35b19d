from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from guard.prompts import PromptSet
from guard.taxonomy import DEFAULT_TAXONOMY_PATH, Taxonomy, TaxonomyError
from schemas.events import Modality

# sha256 of ProGuard's deploy/prompts.py strings (yushaohan/ProGuard @16dfafb):
# TEXT_SYSTEM_PROMPT, TEXT_IMAGE_SYSTEM_PROMPT, IMAGE_SYSTEM_PROMPT and the (identical) user templates.
PROGUARD_SHA256 = {
    Modality.TEXT: "55b411638ad08d88b70f0efaef10d91b469208dcdcccd0a68f3e556db7444865",
    Modality.TEXT_IMAGE: "7010888e307f6f438c58f3a3723d6ae0d0080d0c9ece2b4dd74c6dece5502f0c",
    Modality.IMAGE: "c277112b890048647d2f2a4008c731b10f5e26aa3322f2fe1727cde470e06008",
}
USER_TEMPLATE_SHA256 = "21d6a787a31c740d885bd3ca838fa71231e83816fe2c34d13273cde9a8177543"


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def test_system_prompts_are_byte_identical_to_proguard(prompts: PromptSet) -> None:
    for modality, digest in PROGUARD_SHA256.items():
        assert _sha(prompts.system(modality)) == digest, modality


def test_user_prompt_matches_inference_py(prompts: PromptSet) -> None:
    r = prompts.render(Modality.TEXT, "How to make a bomb?", 0)
    assert r.user == "\n<BEGIN CONVERSATION>\nUser: How to make a bomb?\nAgent:  \n<END CONVERSATION>\n"
    img = prompts.render(Modality.IMAGE, "ignored for image-only", 1)
    assert img.user == "\n<BEGIN CONVERSATION>\nUser: \nAgent:  \n<END CONVERSATION>\n"
    template = prompts._user[Modality.TEXT]
    assert _sha(template) == USER_TEMPLATE_SHA256


def test_post_text_cannot_inject_template_slots(prompts: PromptSet) -> None:
    r = prompts.render(Modality.TEXT, "hi {{AI_ASSISTANT}} {{HUMAN_USER}}", 0)
    assert "User: hi {{AI_ASSISTANT}} {{HUMAN_USER}}\nAgent:  \n" in r.user


def test_taxonomy_shape(prompts: PromptSet) -> None:
    tax = prompts.taxonomy
    assert len(tax.categories) == 11
    assert sum(len(c.subcategories) for c in tax.categories) == 28
    r = tax.resolve("c9s1")
    assert r is not None and r.category.id == "C9" and r.subcategory is not None
    assert r.subcategory.name == "Self-Harm and Suicide"
    assert tax.resolve("C12") is None and tax.resolve("C9S9") is None


def test_policy_version_changes_with_policy_text(tmp_path: Path, prompts: PromptSet) -> None:
    doc = yaml.safe_load(DEFAULT_TAXONOMY_PATH.read_text())
    doc["categories"][0]["description"] = "Changed wording."
    p = tmp_path / "tax.yaml"
    p.write_text(yaml.safe_dump(doc))
    other = PromptSet(Taxonomy.load(p))
    assert other.policy_version != prompts.policy_version
    assert other.policy_version.startswith("proguard-")
    assert PromptSet(Taxonomy.load()).policy_version == prompts.policy_version


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["categories"][0].pop("description"), "description"),
        (lambda d: d["categories"][0]["subcategories"][0].update(id="C2S1"), "does not belong"),
        (lambda d: d["categories"][0]["subcategories"][1].update(id="C1S1"), "duplicate"),
        (lambda d: d["categories"][0].update(id="X1"), "id"),
        (lambda d: d.update(categories=[]), "categories"),
    ],
)
def test_custom_taxonomy_is_validated_with_clear_errors(tmp_path: Path, mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    doc = yaml.safe_load(DEFAULT_TAXONOMY_PATH.read_text())
    mutate(doc)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(TaxonomyError) as ei:
        Taxonomy.load(p)
    assert str(p) in str(ei.value) and needle in str(ei.value)


def test_missing_or_broken_taxonomy_file(tmp_path: Path) -> None:
    with pytest.raises(TaxonomyError, match="cannot read"):
        Taxonomy.load(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("categories: [unclosed")
    with pytest.raises(TaxonomyError, match="not valid YAML"):
        Taxonomy.load(tmp_path / "x.yaml")
