"""Export labeled topics to ProGuard-style RL training data, in the layout a trainer actually reads.

Joins posts, verdicts and human reviews by post_id (a review overrides the model's label), dedups by
content (text + image bytes), balances modalities to configurable ratios (ProGuard's dataset is
modality-balanced), splits train/validation by time (content is deduplicated before the split, so no
repost crosses splits), copies images from S3 into the dataset (or keeps their s3:// refs), and writes
a dataset card.

Each record carries what ProGuard's reward (train/verl/utils/reward_score/safety_grm.py) reads from
``extra_info``: ``query_label``, ``response_label``, ``category`` (the taxonomy id, or "" for an
out-of-taxonomy risk), ``original_category`` (its name / description), ``modality`` and
``synonymous_phrase``. The prompt is ProGuard's own (guard/prompts.py). Two layouts (``fmt``):

- ``trl`` (the default; ``training.launch`` trains on it): ``{split}.jsonl``; the user message is the
  text alone — TRL's GRPOTrainer inserts one image part per entry of ``images`` before the user text
  itself (``trl.data_utils.prepare_multimodal_messages``), so a literal ``<image>`` would reach the
  model as text — and ``images`` are absolute paths (cast to ``datasets.Image`` by the launcher).
- ``verl`` (ProGuard's own trainer, ``train/proguard-train.sh``): ``{split}.parquet``, read by verl's
  ``RLHFDataset`` with ``datasets.load_dataset("parquet")``; one ``<image>`` per image in the user text
  (verl splits the content on it) and ``images`` as ``{"bytes", "path"}`` dicts (its
  ``process_image`` opens the bytes), null for a text post. Needs ``pyarrow`` (the ``train`` extra) and
  copied images.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from guard.chat import user_text
from guard.prompts import PromptSet
from schemas.codec import DecodeError, decode_post
from schemas.events import Modality, PostEvent, ReviewEvent, VerdictEvent
from training.synonyms import SynonymBank
from workers.kafka.topics import read_records
from workers.media import MediaError, MediaFetcher

MODALITY_NAMES = {Modality.TEXT: "text", Modality.IMAGE: "image", Modality.TEXT_IMAGE: "text-image"}


@dataclass
class Label:
    unsafe: bool
    category: str | None  # taxonomy id
    novel_risk: str | None
    source: str  # "human" | "model"


@dataclass
class Sample:
    post: PostEvent
    label: Label
    content_hash: str
    image_files: list[str]

    @property
    def order(self) -> tuple[datetime, str]:
        return (self.post.created_at, self.post.post_id)


@dataclass
class ExportReport:
    posts_read: int = 0
    unlabeled: int = 0
    duplicates: int = 0
    media_errors: int = 0
    available: Counter[str] = field(default_factory=Counter)
    selected: Counter[str] = field(default_factory=Counter)
    splits: Counter[str] = field(default_factory=Counter)
    label_sources: Counter[str] = field(default_factory=Counter)
    categories: Counter[str] = field(default_factory=Counter)
    coarse_labels: int = 0  # unsafe labels with only a main category, for prompts that ask for C*S*


FORMATS = ("trl", "verl")


class ExportError(ValueError):
    """The export would be empty or was asked for something impossible; the message says why and what to
    change. The CLI prints it as one line and exits non-zero (an empty dataset is never written)."""


def check_val_fraction(val_fraction: float) -> None:
    # 0 is allowed on purpose: no validation split (the launcher then trains without eval).
    if not 0.0 <= val_fraction < 1.0 or val_fraction != val_fraction:
        raise ExportError(
            f"validation fraction {val_fraction} is outside [0, 1): pass e.g. --val-fraction 0.1 "
            "(0 = no validation split)"
        )


def parse_ratios(text: str) -> dict[str, float]:
    """``"1:1:1"`` (text:image:text-image) or ``"text=2,image=1,text-image=1"``."""
    names = ["text", "image", "text-image"]
    bad = ExportError(
        f"bad modality ratios {text!r}: use text:image:text-image weights such as 1:1:1, or "
        "name=weight pairs such as text=2,image=1"
    )
    try:
        if "=" in text:
            vals = {k.strip(): float(v) for k, v in (p.split("=") for p in text.split(","))}
        else:
            vals = dict(zip(names, (float(x) for x in text.split(":")), strict=True))
    except ValueError:
        raise bad from None
    if set(vals) - set(names) or any(not v >= 0 for v in vals.values()) or not any(vals.values()):
        raise bad
    total = sum(vals.values())
    return {k: vals.get(k, 0.0) / total for k in names}


def balance(
    groups: dict[str, list[Any]], ratios: dict[str, float], rng: random.Random
) -> dict[str, list[Any]]:
    """The largest selection whose modality counts follow ``ratios`` (random within a modality)."""
    scale = min((len(groups.get(m, [])) / r for m, r in ratios.items() if r > 0), default=0.0)
    out = {}
    for m, items in groups.items():
        k = math.floor(scale * ratios.get(m, 0.0) + 1e-9)
        picked = list(items)
        rng.shuffle(picked)
        out[m] = picked[:k]
    return out


class TrainingExporter:
    def __init__(
        self,
        bootstrap: str,
        prompts: PromptSet,
        fetcher: MediaFetcher | None,
        *,
        posts_topic: str,
        verdicts_topic: str,
        reviews_topic: str,
        bank: SynonymBank | None = None,
        kafka_extra: Mapping[str, str] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.extra = dict(kafka_extra or {})
        self.prompts = prompts
        self.tax = prompts.taxonomy
        self.fetcher = fetcher
        self.posts_topic, self.verdicts_topic, self.reviews_topic = posts_topic, verdicts_topic, reviews_topic
        self.bank = bank or SynonymBank.from_taxonomy(prompts.taxonomy)

    def _latest_verdicts(self) -> dict[str, VerdictEvent]:
        out: dict[str, VerdictEvent] = {}
        for r in read_records(self.bootstrap, self.verdicts_topic, extra=self.extra):
            try:
                v = VerdictEvent.model_validate_json(r.value or b"")
            except ValueError:
                continue
            if v.post_id not in out or out[v.post_id].decided_at <= v.decided_at:
                out[v.post_id] = v
        return out

    def _latest_reviews(self) -> dict[str, ReviewEvent]:
        out: dict[str, ReviewEvent] = {}
        for r in read_records(self.bootstrap, self.reviews_topic, extra=self.extra):
            try:
                v = ReviewEvent.model_validate_json(r.value or b"")
            except ValueError:
                continue
            if v.post_id not in out or out[v.post_id].reviewed_at <= v.reviewed_at:
                out[v.post_id] = v
        return out

    @staticmethod
    def label_for(verdict: VerdictEvent | None, review: ReviewEvent | None) -> Label | None:
        if review is not None:  # human labels override model labels
            return Label(
                review.unsafe,
                review.category if review.unsafe else None,
                review.novel_risk if review.unsafe else None,
                "human",
            )
        if verdict is None or verdict.safe is None or verdict.parse_error:
            return None
        return Label(not verdict.safe, verdict.subcategory or verdict.category, verdict.novel_risk, "model")

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()

    def export(
        self,
        out_dir: Path,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        ratios: dict[str, float] | None = None,
        val_fraction: float = 0.1,
        copy_images: bool = True,
        seed: int = 0,
        on_progress: Callable[[int], None] | None = None,
        fmt: str = "trl",
    ) -> ExportReport:
        if fmt not in FORMATS:
            raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
        if fmt == "verl" and not copy_images:
            raise ValueError("the verl format embeds image bytes: export without --keep-s3-refs")
        check_val_fraction(val_fraction)  # before reading any topic: a bad value costs nothing
        ratios = ratios or parse_ratios("1:1:1")
        rep = ExportReport()
        verdicts, reviews = self._latest_verdicts(), self._latest_reviews()
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        by_hash: dict[str, Sample] = {}
        for r in read_records(self.bootstrap, self.posts_topic, extra=self.extra):
            if on_progress:
                on_progress(1)
            try:
                post = decode_post(r.value)
            except DecodeError:
                continue
            if (start and post.created_at < start) or (end and post.created_at > end):
                continue
            rep.posts_read += 1
            label = self.label_for(verdicts.get(post.post_id), reviews.get(post.post_id))
            if label is None:
                rep.unlabeled += 1
                continue
            if (
                label.unsafe
                and label.category
                and self.target_category(label.category, post.modality) is None
            ):
                rep.coarse_labels += 1
                continue
            digests, files = [], []
            try:
                for ref in post.image_refs:
                    if self.fetcher is None:
                        raise MediaError(post_error_code(), "no media fetcher")
                    img = self.fetcher.fetch_one(ref)
                    digests.append(img.sha256)
                    if copy_images:
                        path = out_dir / "images" / f"{img.sha256}.png"
                        if not path.exists():
                            img.image.save(path, format="PNG")
                        files.append(f"images/{img.sha256}.png")
                    else:
                        files.append(ref.uri())
            except MediaError:
                rep.media_errors += 1
                continue
            h = hashlib.sha256("\x00".join([post.text or "", *digests]).encode()).hexdigest()
            smp = Sample(post, label, h, files)
            prev = by_hash.get(h)
            if prev is None:
                by_hash[h] = smp
                continue
            # Partitions interleave in any order: keep the earliest post of the content (the original, not
            # a repost) so the export does not depend on read order; a human label on any copy wins.
            rep.duplicates += 1
            keep, drop = (smp, prev) if smp.order < prev.order else (prev, smp)
            if keep.label.source == "model" and drop.label.source == "human":
                keep.label = drop.label
            by_hash[h] = keep
        groups: dict[str, list[Sample]] = {}
        for smp in by_hash.values():
            m = MODALITY_NAMES[smp.post.modality]
            groups.setdefault(m, []).append(smp)
            rep.available[m] += 1
        chosen = [s for items in balance(groups, ratios, random.Random(seed)).values() for s in items]
        chosen.sort(key=lambda s: s.order)
        n_val = math.ceil(len(chosen) * val_fraction) if chosen and val_fraction > 0 else 0
        splits = {"train": chosen[: len(chosen) - n_val], "validation": chosen[len(chosen) - n_val :]}
        if not splits["train"]:
            raise ExportError(empty_reason(rep, ratios, len(chosen), start, end))
        self.write_splits(out_dir, splits, rep, fmt)
        self.write_card(out_dir, rep, ratios, val_fraction, fmt)
        self.bank.save(out_dir / "synonym_bank.json")
        return rep

    def write_splits(
        self, out_dir: Path, splits: dict[str, list[Sample]], rep: ExportReport, fmt: str = "trl"
    ) -> None:
        """Write each split's records in ``fmt``'s layout (images already under ``out_dir``)."""
        for split, items in splits.items():
            records = [self.record(smp, split, i, fmt=fmt, root=out_dir) for i, smp in enumerate(items)]
            for smp, rec in zip(items, records, strict=True):
                rep.selected[rec["extra_info"]["modality"]] += 1
                rep.splits[split] += 1
                rep.label_sources[smp.label.source] += 1
                rep.categories[
                    rec["extra_info"]["category"] or ("safe" if not smp.label.unsafe else "out-of-taxonomy")
                ] += 1
            if fmt == "verl":
                write_parquet(out_dir / f"{split}.parquet", records)
            else:
                with (out_dir / f"{split}.jsonl").open("w", encoding="utf-8") as f:
                    f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)

    def target_category(self, code: str, modality: Modality) -> tuple[str, str] | None:
        """The (id, name) the prompt for ``modality`` asks for, from a label's taxonomy id: the text-image
        prompt asks for a main category (C*), the text and image prompts for a subcategory (C*S*). A
        label with only a main category fits the latter only when that category has one subcategory;
        ``None`` otherwise (exporting ``C9`` would reward an answer the prompt forbids). A label id the
        taxonomy lacks is exported as an out-of-taxonomy risk: ("", id)."""
        res = self.tax.resolve(code)
        if res is None:
            return "", code
        if modality is Modality.TEXT_IMAGE:
            return res.category.id, res.category.name
        sub = res.subcategory
        if sub is None and len(res.category.subcategories) == 1:
            sub = res.category.subcategories[0]
        return (sub.id, sub.name) if sub else None

    def record(
        self, smp: Sample, split: str, index: int, *, fmt: str = "trl", root: Path | None = None
    ) -> dict[str, Any]:
        post, lab = smp.post, smp.label
        modality = post.modality
        rendered = self.prompts.render(modality, post.text, len(smp.image_files))
        category, name = "", ""
        if lab.unsafe and lab.category:
            target = self.target_category(lab.category, modality)
            if target is None:  # export() skips (and counts) these before any image is fetched
                raise ValueError(
                    f"{post.post_id}: label {lab.category} has only a main category and the "
                    f"{MODALITY_NAMES[modality]} prompt asks for a subcategory (C*S*)"
                )
            category, name = target
        if lab.unsafe and not name:
            name = lab.novel_risk or "Unspecified Emerging Risk"
        synonyms = self.bank.synonyms(name) if name else []
        answer = "\n".join(
            [
                "Request:unsafe" if lab.unsafe else "Request:safe",
                *([] if modality is Modality.IMAGE else ["Response:safe"]),
                f"Category:{category or name if lab.unsafe else 'None'}",
            ]
        )
        base = root or Path(".")
        images: list[Any] | None
        if fmt == "verl":
            user = "<image>" * len(smp.image_files) + user_text(rendered)
            # A text post's images are null, not []: RLHFDataset.__getitem__ skips a None image column
            # but hands [] to the processor, and Qwen2.5-VL's image processor fails on an empty list.
            images = [{"bytes": (base / f).read_bytes(), "path": f} for f in smp.image_files] or None
        else:
            user = user_text(rendered)
            images = [f if f.startswith("s3://") else str((base / f).resolve()) for f in smp.image_files]
        return {
            "data_source": "guardstream",
            "prompt": [
                {"role": "system", "content": rendered.system},
                {"role": "user", "content": user},
            ],
            "images": images,
            "ability": "safety",
            "reward_model": {"style": "rule", "ground_truth": f"<answer>\n{answer}\n</answer>"},
            "extra_info": {
                "index": index,
                "split": split,
                "post_id": post.post_id,
                "content_hash": smp.content_hash,
                "modality": MODALITY_NAMES[modality],
                "query_label": "unsafe" if lab.unsafe else "safe",
                "response_label": "safe",
                "category": category,
                "original_category": name,
                "synonymous_phrase": synonyms,
                "label_source": lab.source,
                "created_at": post.created_at.isoformat(),
            },
        }

    def write_card(
        self,
        out_dir: Path,
        rep: ExportReport,
        ratios: dict[str, float],
        val_fraction: float,
        fmt: str = "trl",
    ) -> None:
        card = {
            "format": fmt,
            "policy_version": self.prompts.policy_version,
            "coarse_labels_skipped": rep.coarse_labels,
            "posts_read": rep.posts_read,
            "unlabeled_skipped": rep.unlabeled,
            "duplicates_removed": rep.duplicates,
            "media_errors": rep.media_errors,
            "available_per_modality": dict(rep.available),
            "target_ratios": ratios,
            "selected_per_modality": dict(rep.selected),
            "splits": dict(rep.splits),
            "validation_fraction": val_fraction,
            "label_sources": dict(rep.label_sources),
            "categories": dict(rep.categories),
        }
        (out_dir / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True), encoding="utf-8")
        lines = [
            "# guardstream training export",
            "",
            f"ProGuard-style RL data, `{fmt}` layout: "
            + (
                "`train.jsonl`, `validation.jsonl` (TRL)"
                if fmt == "trl"
                else "`train.parquet`, `validation.parquet` (verl)"
            )
            + ", `images/`,",
            "`synonym_bank.json`. Human review labels override model labels; content is deduplicated",
            "before a time-ordered train/validation split.",
            "",
            f"- policy version: `{self.prompts.policy_version}`",
            f"- posts read: {rep.posts_read}; unlabeled skipped: {rep.unlabeled}; duplicates removed: "
            f"{rep.duplicates}; media errors: {rep.media_errors}; labels with only a main category for "
            f"a prompt that asks for a subcategory, skipped: {rep.coarse_labels}",
            "",
            "| modality | available | target ratio | selected |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {m} | {rep.available.get(m, 0)} | {ratios.get(m, 0):.2f} | {rep.selected.get(m, 0)} |"
            for m in ("text", "image", "text-image")
        ]
        lines += ["", "| split | records |", "| --- | --- |"] + [
            f"| {k} | {v} |" for k, v in rep.splits.items()
        ]
        lines += ["", "| label source | records |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in rep.label_sources.items()]
        lines += ["", "| category | records |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(rep.categories.items())]
        (out_dir / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def empty_reason(
    rep: ExportReport, ratios: dict[str, float], chosen: int, start: datetime | None, end: datetime | None
) -> str:
    """Why nothing (or only a validation split) was selected, in the order an operator would check."""
    window = f" between {start or 'the beginning'} and {end or 'now'}" if start or end else ""
    if rep.posts_read == 0:
        return f"no posts{window} on the posts topic: check --from/--to and GUARDSTREAM_POSTS_TOPIC"
    labeled = rep.posts_read - rep.unlabeled
    if labeled == 0:
        return (
            f"{rep.posts_read} posts{window} but none has a verdict or a review: run the worker over them "
            "(or publish reviews) first"
        )
    if not rep.available:
        return (
            f"{labeled} labeled posts, none usable: {rep.media_errors} image fetch errors, "
            f"{rep.coarse_labels} labels with only a main category for a prompt that asks for C*S*"
        )
    if chosen == 0:
        missing = [m for m, r in ratios.items() if r > 0 and rep.available[m] == 0]
        have = ", ".join(f"{m}={n}" for m, n in sorted(rep.available.items()))
        return (
            f"the modality ratios select 0 records: none available for {', '.join(missing)} (available: "
            f"{have}); pass --ratios with only those, e.g. --ratios "
            + ",".join(f"{m}=1" for m in sorted(rep.available))
        )
    return (
        f"only {chosen} record(s) selected and all of them went to the validation split: lower "
        "--val-fraction (0 = no validation split) or export a longer range"
    )


def write_parquet(path: Path, records: list[dict[str, Any]]) -> None:
    """verl's layout: one row per record; ``images`` typed explicitly as ``list<struct<bytes, path>>``
    (a split of text posts alone would otherwise infer ``list<null>``)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the verl export format needs pyarrow: pip install -e '.[train]'") from exc
    image_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    images = pa.array([r["images"] for r in records], type=image_type)
    rest = [{k: v for k, v in r.items() if k != "images"} for r in records]
    table = pa.Table.from_pylist(rest) if rest else pa.table({})
    pq.write_table(table.append_column("images", images), path)


def post_error_code() -> Any:
    from schemas.events import ErrorCode

    return ErrorCode.S3_UNAVAILABLE
