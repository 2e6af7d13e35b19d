"""Training exports in the layouts their trainers read, loaded by the consumers' own loaders, and the
launcher's dry run through the real TRL objects (``train`` extra; skipped without it, with the reason)."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from guard.chat import IMAGE_PLACEHOLDER, render_qwen2_5_vl, user_text
from guard.prompts import PromptSet
from guard.samples import drawn_image
from schemas.codec import decode_post
from schemas.events import Modality, ReviewEvent
from training import launch
from training.export import ExportReport, Label, Sample, TrainingExporter
from workers.demo.sample_feed import post

T0 = datetime(2026, 5, 1, tzinfo=UTC)
# (width, height) of each exported image, by post: every side a multiple of 28 and the area within the
# engine's [min_pixels, max_pixels], so Qwen2-VL's smart_resize keeps the size and an image is
# (h/14)·(w/14) patches of 14², merged 2x2 into (h/28)·(w/28) <|image_pad|> tokens.
SIZES = {"p2": [(56, 56)], "p3": [(112, 56)], "p5": [(56, 56), (84, 56)]}
PATCH_VALUES = 3 * 2 * 14 * 14  # channels · temporal patch · patch²


def sample(
    out: Path, i: int, text: str | None, n_images: int, label: Label, size: tuple[int, int] = (56, 56)
) -> Sample:
    refs = [f"s3://bucket/p{i}-{j}.png" for j in range(n_images)]
    files = []
    for j in range(n_images):
        (out / "images").mkdir(parents=True, exist_ok=True)
        wh = SIZES.get(f"p{i}", [size] * n_images)[j]
        drawn_image(10 * i + j, wh).save(out / "images" / f"p{i}-{j}.png", format="PNG")
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


def _trl() -> Any:
    return pytest.importorskip("trl", reason="the train extra is not installed: pip install -e '.[train]'")


@pytest.fixture(scope="module")
def vl_processor() -> Any:
    """The real Qwen2.5-VL processor classes around guard.gpu_proof's local tokenizer (~3 s, no download)."""
    _trl()
    return launch.tiny_vl_processor()


def pad_runs(ids: list[int], processor: Any) -> list[int]:
    """The length of each ``<|vision_start|> <|image_pad|>* <|vision_end|>`` block, in order; a block
    holding anything but pads, or a pad outside a block, is -1."""
    tok = processor.tokenizer
    start, end, pad = (
        tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
    )
    runs: list[int] = []
    inside = False
    for i in ids:
        if i == start:
            inside, runs = True, [*runs, 0]
        elif i == end:
            inside = False
        elif inside:
            runs[-1] = runs[-1] + 1 if i == pad and runs[-1] >= 0 else -1
        elif i == pad:
            runs.append(-1)
    return runs


def expected_vision(post_id: str) -> tuple[list[int], list[list[int]]]:
    """(<|image_pad|> tokens per image, image_grid_thw rows) for a post's images, from their sizes."""
    sizes = SIZES.get(post_id, [])
    return [w * h // 28**2 for w, h in sizes], [[1, h // 14, w // 14] for w, h in sizes]


def engine_prompt(prompts: PromptSet, text: str | None, n_images: int, pads: list[int]) -> str:
    """What the engines send for the post (guard.chat), with each image's placeholder expanded to its
    pad tokens, as the processor expands it."""
    modality = Modality.TEXT_IMAGE if text and n_images else (Modality.IMAGE if n_images else Modality.TEXT)
    r = prompts.render(modality, text, n_images)
    out = render_qwen2_5_vl(r.system, user_text(r), n_images)
    for n in pads:
        out = out.replace(
            IMAGE_PLACEHOLDER, "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>\x00", 1
        )
    return out.replace("\x00", "")


POST_TEXT = {  # the posts of export(), by id
    "p0": "Buy cocaine here, discreet shipping",
    "p1": "Lovely sunset at the lake",
    "p2": None,
    "p3": "look at this",
    "p4": "new challenge!",
    "p5": None,
}


def test_an_exported_image_sample_goes_through_trls_own_vlm_input_path(
    prompts: PromptSet, tmp_path: Path, vl_processor: Any
) -> None:
    """The exported TRL records with images, loaded as the launcher loads them (datasets' JSON loader,
    ``images`` cast to ``datasets.Image``), through the functions GRPOTrainer (trl 1.16) calls for a
    vision-language model, with the real Qwen2.5-VL processor:

    1. ``_generate_and_score_completions`` (grpo_trainer.py:2400-2424): the ``images`` column, then
       ``trl.data_utils.prepare_multimodal_messages(prompt, images=...)`` (data_utils.py:32);
    2. ``GRPOTrainer._tokenize_prompts`` (grpo_trainer.py:1684), TRL's own code run on a stub trainer:
       ``prepare_multimodal_messages`` again, then ``processing_class.apply_chat_template(conversation,
       tokenize=True, return_dict=True)``: the generation inputs (prompt ids, pixel_values, grids);
    3. the forward inputs (grpo_trainer.py:2518-2531): ``trl.data_utils.apply_chat_template``
       (data_utils.py:167) per prompt, then ``processing_class(images=..., text=..., padding=True)``.
    """
    _trl()
    from trl import GRPOTrainer
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    export(prompts, tmp_path, "trl")
    data = launch.load_trl_dataset(tmp_path)
    rows = [r for split in data for r in data[split] if r["images"]]
    assert sorted(r["extra_info"]["post_id"] for r in rows) == ["p2", "p3", "p5"]
    images = [r["images"] for r in rows]  # grpo_trainer.py:2400-2401
    assert [[im.size for im in ims] for ims in images] == [SIZES[r["extra_info"]["post_id"]] for r in rows]
    convs = [
        prepare_multimodal_messages(r["prompt"], images=ims) for r, ims in zip(rows, images, strict=True)
    ]
    stub = SimpleNamespace(
        _is_vlm=True,
        environment_factories=None,
        processing_class=vl_processor,
        tools=None,
        chat_template=None,
        chat_template_kwargs={},
    )
    prompt_ids, gen_images, mm = GRPOTrainer._tokenize_prompts(stub, convs)
    assert gen_images == images  # the images TRL generates with are the exported ones, in order
    texts = [apply_chat_template({"prompt": c}, vl_processor)["prompt"] for c in convs]
    fwd = vl_processor(images=images, text=texts, padding=True, return_tensors="pt")

    all_grids: list[list[int]] = []
    for r, ids, text, fwd_ids, fwd_mask in zip(
        rows, prompt_ids, texts, fwd["input_ids"], fwd["attention_mask"], strict=True
    ):
        pid = r["extra_info"]["post_id"]
        pads, grids = expected_vision(pid)
        all_grids += grids
        # one vision block per image, holding exactly that image's pad tokens, nothing else
        assert pad_runs(list(ids), vl_processor) == pads, pid
        assert fwd_ids[fwd_mask.bool()].tolist() == list(ids), pid  # both paths tokenize alike
        # the rendered prompt is the engines' prompt for this post, with the processor's expansion
        want = engine_prompt(prompts, POST_TEXT[pid], len(pads), pads)
        assert vl_processor.tokenizer.decode(list(ids)) == want, pid
        assert text == engine_prompt(prompts, POST_TEXT[pid], len(pads), [1] * len(pads)), pid
    for inputs in (mm, fwd):
        assert inputs["image_grid_thw"].tolist() == all_grids
        assert tuple(inputs["pixel_values"].shape) == (sum(t * h * w for t, h, w in all_grids), PATCH_VALUES)
    assert (
        launch.vision_problems(prompt_ids, mm["image_grid_thw"], mm["pixel_values"], [1, 1, 2], vl_processor)
        == []
    )
    assert launch.vision_problems(
        prompt_ids, mm["image_grid_thw"], mm["pixel_values"], [2, 1, 1], vl_processor
    )


def verl_getitem(row: dict[str, Any], processor: Any) -> dict[str, Any]:
    """What verl's ``RLHFDataset`` reads from a parquet row, transcribed (verl is not a dependency):
    volcengine/verl ``verl/utils/dataset/rl_dataset.py`` (commit aab094c8 in the reference index) with its
    config defaults ``prompt_key="prompt"``, ``image_key="images"``, ``video_key="videos"``:

    - ``_build_messages``: pops ``prompt``; when the row has an ``images`` (or ``videos``) column, splits
      every message's string ``content`` on ``(<image>|<video>)``, drops empty segments, and makes
      ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts;
    - ``__getitem__``: ``processor.apply_chat_template(messages, add_generation_prompt=True,
      tokenize=False)``; when ``images`` is present and not None, ``process_image`` on each
      (``verl/utils/dataset/vision_utils.py``: a dict with ``bytes`` and no ``image`` key is opened with
      PIL, then ``qwen_vl_utils.fetch_image`` converts to RGB and smart-resizes with factor 28 — the
      identity for these sizes); ``processor(text=[raw_prompt], images=images, return_tensors="pt")``;
      ``extra_info["index"]`` (plus optional ``tools_kwargs`` / ``need_tools_kwargs`` /
      ``expected_structure``, which we do not set);
    - the reward manager then reads ``data_source``, ``reward_model["ground_truth"]`` and ``extra_info``
      (ProGuard's ``safety_grm.compute_score``, see training/rewards.py)."""
    from PIL import Image

    row = dict(row)
    messages = row.pop("prompt")
    assert "videos" not in row  # a videos column would be handed to process_video
    if "images" in row:
        for m in messages:
            segments = [x for x in re.split("(<image>|<video>)", m["content"]) if x != ""]
            m["content"] = [
                {"type": "image"} if x == "<image>" else {"type": "text", "text": x} for x in segments
            ]
    raw_prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = None
    if row.get("images") is not None:
        for img in row["images"]:
            assert "image" not in img  # process_image asserts it
        images = [Image.open(io.BytesIO(img["bytes"])).convert("RGB") for img in row.pop("images")]
    inputs = processor(text=[raw_prompt], images=images, return_tensors="pt")
    return {
        "inputs": inputs,
        "n_images": len(images or []),
        "index": row.get("extra_info", {}).get("index", 0),
        "data_source": row["data_source"],
        "ground_truth": row["reward_model"]["ground_truth"],
        "extra_info": row["extra_info"],
    }


def test_verl_layout_is_read_by_verls_own_path(prompts: PromptSet, tmp_path: Path, vl_processor: Any) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="the train extra: pip install -e '.[train]'")
    datasets = pytest.importorskip("datasets", reason="the train extra: pip install -e '.[train]'")

    export(prompts, tmp_path, "verl")
    for split in ("train", "validation"):
        schema = pq.read_schema(tmp_path / f"{split}.parquet")
        assert str(schema.field("images").type) == "list<element: struct<bytes: binary, path: string>>"
        assert "videos" not in schema.names
    # RLHFDataset._read_files_and_tokenize: datasets.load_dataset("parquet") per file, concatenated
    frame = datasets.concatenate_datasets(
        [
            datasets.load_dataset("parquet", data_files=str(tmp_path / f"{s}.parquet"))["train"]
            for s in ("train", "validation")
        ]
    )
    assert len(frame) == 6
    for i in range(len(frame)):
        row = frame[i]
        pid = row["extra_info"]["post_id"]
        got = verl_getitem(row, vl_processor)
        pads, grids = expected_vision(pid)
        ids = got["inputs"]["input_ids"][0].tolist()
        assert got["n_images"] == len(pads) and pad_runs(ids, vl_processor) == pads, pid
        if pads:
            assert got["inputs"]["image_grid_thw"].tolist() == grids
            assert tuple(got["inputs"]["pixel_values"].shape) == (sum(n * 4 for n in pads), PATCH_VALUES)
        else:
            assert row["images"] is None and "pixel_values" not in got["inputs"], pid
        # the same prompt as the engines (and as the TRL layout) once the processor has expanded it
        want = engine_prompt(prompts, POST_TEXT[pid], len(pads), pads)
        assert vl_processor.tokenizer.decode(ids) == want, pid
        assert isinstance(got["index"], int) and got["data_source"] == "guardstream"
        assert got["ground_truth"].startswith("<answer>\nRequest:")
        assert got["extra_info"]["query_label"] in ("safe", "unsafe")
    with pytest.raises(ValueError, match="keep-s3-refs"):
        TrainingExporter("x", prompts, None, posts_topic="p", verdicts_topic="v", reviews_topic="r").export(
            tmp_path / "no", fmt="verl", copy_images=False
        )
    assert launch.dry_run({"dataset_dir": str(tmp_path)}, Console(file=io.StringIO()), trl=False) == 1


class FakeFetcher:
    def fetch_one(self, ref: Any) -> Any:
        return SimpleNamespace(sha256=ref.uri().rsplit("/", 1)[1][:-4], image=drawn_image(1, (56, 56)))

    def close(self) -> None:
        pass


def test_a_main_category_label_is_skipped_for_a_subcategory_prompt_and_kept_for_text_image(
    prompts: PromptSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reviewer's ``C9`` (a main category with three subcategories): the text and image prompts ask for
    ``C*S*``, so those posts are skipped and counted; the text-image prompt asks for ``C*``, so that post
    is exported with ``C9``. ``record`` refuses such a label outright."""
    topics = {
        "p": [
            post("t-c9", "u", "how to hurt someone", at=T0),
            post("i-c9", "u", None, ["s3://bucket/i-c9.png"], at=T0 + timedelta(minutes=1)),
            post("c-c9", "u", "look", ["s3://bucket/c-c9.png"], at=T0 + timedelta(minutes=2)),
            post("t-c9s1", "u", "I want to hurt myself", at=T0 + timedelta(minutes=3)),
            post("i-c10s2", "u", None, ["s3://bucket/i-c10s2.png"], at=T0 + timedelta(minutes=4)),
        ],
        "v": [],
        "r": [
            ReviewEvent(post_id=pid, unsafe=True, category=cat, reviewer_id="r").model_dump_json().encode()
            for pid, cat in [
                ("t-c9", "C9"),
                ("i-c9", "C9"),
                ("c-c9", "C9"),
                ("t-c9s1", "C9S1"),
                ("i-c10s2", "C10S2"),
            ]
        ],
    }
    monkeypatch.setattr(
        "training.export.read_records",
        lambda bootstrap, topic, extra=None: [SimpleNamespace(value=v) for v in topics[topic]],
    )
    exp = TrainingExporter(
        "unused:9092",
        prompts,
        FakeFetcher(),
        posts_topic="p",
        verdicts_topic="v",
        reviews_topic="r",
    )
    rep = exp.export(tmp_path, val_fraction=0.0)
    assert rep.coarse_labels == 2
    assert json.loads((tmp_path / "card.json").read_text())["coarse_labels_skipped"] == 2
    recs = {r["extra_info"]["post_id"]: r for r in launch.load_split(tmp_path / "train.jsonl")}
    assert set(recs) == {"c-c9", "t-c9s1", "i-c10s2"}  # t-c9 and i-c9 are not exported at all
    got = {
        pid: (r["extra_info"]["category"], r["extra_info"]["original_category"]) for pid, r in recs.items()
    }
    assert got == {
        "c-c9": ("C9", "Real-World Harm"),
        "t-c9s1": ("C9S1", "Self-Harm and Suicide"),
        "i-c10s2": ("C10S2", exp.tax.resolve("C10S2").subcategory.name),
    }
    assert recs["c-c9"]["reward_model"]["ground_truth"] == (
        "<answer>\nRequest:unsafe\nResponse:safe\nCategory:C9\n</answer>"
    )
    assert exp.target_category("C9", Modality.TEXT) is None
    assert exp.target_category("C9", Modality.IMAGE) is None
    assert exp.target_category("C9S1", Modality.TEXT_IMAGE) == ("C9", "Real-World Harm")
    with pytest.raises(ValueError, match="only a main category"):
        exp.record(sample(tmp_path, 7, "x", 0, Label(True, "C9", None, "human")), "train", 0)


def test_dry_run_builds_the_real_grpo_config_and_runs_text_and_image_grpo_steps(
    prompts: PromptSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _trl()
    export(prompts, tmp_path, "trl")
    assert launch.main(["--dataset-dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "GRPOConfig ok: 16 generations" in out
    assert "image GRPO step ok: p2 on a tiny Qwen2.5-VL" in out
    steps = {
        m.group(1): json.loads(m.group(2))
        for m in re.finditer(r"GRPO (\w+) step on a tiny policy, mean rewards: (\{.*\})", out)
    }
    names = {"format_reward", "binary_reward", "category_reward", "ood_similarity_reward"}
    assert set(steps) == {"text", "image"} and all(set(m) == names for m in steps.values())


def test_a_grpo_argument_trl_removed_fails_the_dry_run(tmp_path: Path) -> None:
    _trl()
    cfg = {"output_dir": str(tmp_path), "grpo_extra": {"max_prompt_length": 3072}}
    with pytest.raises(TypeError, match="max_prompt_length"):
        launch.grpo_config(cfg, use_cpu=True)
