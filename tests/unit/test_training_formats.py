"""Training exports in the layouts their trainers read, loaded by the consumers' own loaders, and the
launcher's dry run through the real TRL objects (``train`` extra; skipped without it, with the reason)."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from guard.chat import render_qwen2_5_vl
from guard.prompts import PromptSet
from guard.samples import drawn_image
from schemas.codec import decode_post
from training import launch
from training.export import ExportReport, Label, Sample, TrainingExporter
from workers.demo.sample_feed import post

T0 = datetime(2026, 5, 1, tzinfo=UTC)


def sample(out: Path, i: int, text: str | None, n_images: int, label: Label) -> Sample:
    refs = [f"s3://bucket/p{i}-{j}.png" for j in range(n_images)]
    files = []
    for j in range(n_images):
        (out / "images").mkdir(parents=True, exist_ok=True)
        drawn_image(10 * i + j, (56, 56)).save(out / "images" / f"p{i}-{j}.png", format="PNG")
        files.append(f"images/p{i}-{j}.png")
    p = decode_post(post(f"p{i}", "u", text, refs or None, at=T0 + timedelta(minutes=i)))
    return Sample(p, label, f"h{i}", files)


def export(prompts: PromptSet, out: Path, fmt: str) -> tuple[TrainingExporter, ExportReport]:
    exp = TrainingExporter(
        "unused:9092", prompts, None, posts_topic="p", verdicts_topic="v", reviews_topic="r"
    )
    train = [
        sample(out, 0, "Buy cocaine here, discreet shipping", 0, Label(True, "C2S1", None, "model")),
        sample(out, 1, "Lovely sunset at the lake", 0, Label(False, None, None, "model")),
        sample(out, 2, None, 1, Label(True, "C10S2", None, "human")),
        sample(out, 3, "look at this", 1, Label(True, "C9S1", None, "human")),
        sample(out, 4, "new challenge!", 0, Label(True, None, "Dangerous Viral Challenge", "human")),
    ]
    val = [sample(out, 5, None, 2, Label(False, None, None, "human"))]
    rep = ExportReport()
    exp.write_splits(out, {"train": train, "validation": val}, rep, fmt)
    exp.write_card(out, rep, {"text": 1.0}, 0.2, fmt)
    return exp, rep


def test_trl_layout_has_no_literal_image_placeholder(prompts: PromptSet, tmp_path: Path) -> None:
    export(prompts, tmp_path, "trl")
    recs = launch.load_split(tmp_path / "train.jsonl") + launch.load_split(tmp_path / "validation.jsonl")
    assert len(recs) == 6 and launch.validate(recs, tmp_path) == []
    for r in recs:
        assert all("<image>" not in m["content"] for m in r["prompt"])
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in r["images"])
    by_id = {r["extra_info"]["post_id"]: r for r in recs}
    assert by_id["p3"]["extra_info"]["category"] == "C9"  # the text-image prompt asks for C*
    assert by_id["p2"]["extra_info"]["category"] == "C10S2"
    assert json.loads((tmp_path / "card.json").read_text())["format"] == "trl"


def test_verl_layout_is_read_by_verls_own_path(prompts: PromptSet, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="the train extra: pip install -e '.[train]'")
    datasets = pytest.importorskip("datasets", reason="the train extra: pip install -e '.[train]'")
    from PIL import Image

    export(prompts, tmp_path, "verl")
    schema = pq.read_schema(tmp_path / "train.parquet")
    assert str(schema.field("images").type) == "list<element: struct<bytes: binary, path: string>>"
    assert str(pq.read_schema(tmp_path / "validation.parquet").field("images").type).startswith("list<")
    # verl's RLHFDataset reads each file with datasets.load_dataset("parquet") ...
    rows = list(datasets.load_dataset("parquet", data_files=str(tmp_path / "train.parquet"))["train"])
    rows += list(datasets.load_dataset("parquet", data_files=str(tmp_path / "validation.parquet"))["train"])
    assert len(rows) == 6
    for row in rows:
        # ... builds messages by splitting each content on "<image>" (RLHFDataset._build_messages) ...
        parts = [p for m in row["prompt"] for p in re.split("(<image>)", m["content"]) if p]
        assert parts.count("<image>") == len(row["images"])
        # ... and opens each image's bytes (verl.utils.dataset.vision_utils.process_image)
        for img in row["images"]:
            assert Image.open(io.BytesIO(img["bytes"])).size == (56, 56)
            assert (tmp_path / img["path"]).is_file()
        assert row["extra_info"]["query_label"] in ("safe", "unsafe")
    with pytest.raises(ValueError, match="keep-s3-refs"):
        TrainingExporter("x", prompts, None, posts_topic="p", verdicts_topic="v", reviews_topic="r").export(
            tmp_path / "no", fmt="verl", copy_images=False
        )
    assert launch.dry_run({"dataset_dir": str(tmp_path)}, Console(file=io.StringIO()), trl=False) == 1


def test_a_main_category_label_is_not_exported_for_a_subcategory_prompt(
    prompts: PromptSet, tmp_path: Path
) -> None:
    exp = TrainingExporter("x", prompts, None, posts_topic="p", verdicts_topic="v", reviews_topic="r")
    from schemas.events import Modality

    assert exp.target_category("C9", Modality.TEXT) is None
    assert exp.target_category("C9", Modality.IMAGE) is None
    assert exp.target_category("C9", Modality.TEXT_IMAGE) == ("C9", "Real-World Harm")
    assert exp.target_category("C9S1", Modality.TEXT_IMAGE) == ("C9", "Real-World Harm")
    assert exp.target_category("C9S1", Modality.TEXT) == ("C9S1", "Self-Harm and Suicide")
    rec = exp.record(sample(tmp_path, 7, "x", 0, Label(True, "C9", None, "human")), "train", 0)
    assert rec["extra_info"]["category"] != "C9"


def _trl() -> Any:
    return pytest.importorskip("trl", reason="the train extra is not installed: pip install -e '.[train]'")


def test_dry_run_builds_the_real_grpo_config_and_runs_a_grpo_step(prompts: PromptSet, tmp_path: Path) -> None:
    _trl()
    import yaml

    export(prompts, tmp_path, "trl")
    cfg = yaml.safe_load(Path(launch.__file__).with_name("grpo.yaml").read_text())
    cfg["dataset_dir"] = str(tmp_path)
    out = io.StringIO()
    means = launch.trl_dry_run(cfg, tmp_path, Console(file=out, width=200))
    assert set(means) == {"format_reward", "binary_reward", "category_reward", "ood_similarity_reward"}
    assert "GRPOConfig ok: 16 generations" in out.getvalue()
    # the exported prompts render through TRL's message preparation exactly as the engines render them
    data = launch.load_trl_dataset(tmp_path)
    row = next(r for r in data["train"] if r["images"])
    assert row["images"][0].size == (56, 56)  # datasets.Image decoded the absolute path
    assert (
        render_qwen2_5_vl(row["prompt"][0]["content"], row["prompt"][1]["content"], 1).count(
            "<|vision_start|>"
        )
        == 1
    )
    assert launch.main(["--dataset-dir", str(tmp_path), "--dry-run"]) == 0


def test_a_grpo_argument_trl_removed_fails_the_dry_run(tmp_path: Path) -> None:
    _trl()
    cfg = {"output_dir": str(tmp_path), "grpo_extra": {"max_prompt_length": 3072}}
    with pytest.raises(TypeError, match="max_prompt_length"):
        launch.grpo_config(cfg, use_cpu=True)
