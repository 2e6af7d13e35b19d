"""Event models (pydantic v2). Serialization is JSON, UTF-8."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SUPPORTED_POST_VERSIONS: frozenset[int] = frozenset({1})
MAX_TEXT_CHARS = 20_000
MAX_IMAGES_PER_POST = 4

_S3_RE = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<key>[^\x00]{1,1024})$")


class Modality(StrEnum):
    TEXT = "text"
    IMAGE = "image"
    TEXT_IMAGE = "text_image"


def modality_of(text: str | None, has_images: bool) -> Modality:
    """Blank text does not count: an image with a whitespace caption is an image post."""
    if has_images and text and text.strip():
        return Modality.TEXT_IMAGE
    return Modality.IMAGE if has_images else Modality.TEXT


class ErrorCode(StrEnum):
    """Stable reasons a post is dead-lettered. Downstream alerting keys on these strings."""

    INVALID_JSON = "invalid_json"
    INVALID_EVENT = "invalid_event"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    EMPTY_POST = "empty_post"
    TEXT_TOO_LONG = "text_too_long"
    IMAGE_REF_INVALID = "image_ref_invalid"
    IMAGE_BUCKET_NOT_ALLOWED = "image_bucket_not_allowed"
    IMAGE_NOT_FOUND = "image_not_found"
    IMAGE_EMPTY = "image_empty"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_NOT_AN_IMAGE = "image_not_an_image"
    IMAGE_TRUNCATED = "image_truncated"
    IMAGE_DECOMPRESSION_BOMB = "image_decompression_bomb"
    S3_UNAVAILABLE = "s3_unavailable"
    ENGINE_FAILED = "engine_failed"
    ENGINE_OUTPUT_UNPARSEABLE = "engine_output_unparseable"
    ENGINE_TIMEOUT = "engine_timeout"  # the engine did not answer within ENGINE_TIMEOUT_S, twice
    INTERNAL_ERROR = "internal_error"  # an unexpected exception while preparing this record (a bug)


class ImageRef(BaseModel):
    """A parsed ``s3://bucket/key`` reference."""

    model_config = ConfigDict(frozen=True)
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> ImageRef:
        m = _S3_RE.match(uri)
        if m is None:
            raise ValueError(f"not an s3://bucket/key reference: {uri[:200]!r}")
        return cls(bucket=m["bucket"], key=m["key"])

    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class PostEvent(BaseModel):
    """A user-generated post on the posts topic (schema v1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    post_id: Annotated[str, Field(min_length=1, max_length=256)]
    author_id: Annotated[str, Field(min_length=1, max_length=256)]
    created_at: datetime
    text: str | None = None
    images: Annotated[list[str], Field(max_length=MAX_IMAGES_PER_POST)] = Field(default_factory=list)
    locale: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("schema_version", mode="before")
    @classmethod
    def _version_is_an_int(cls, v: object) -> object:
        if isinstance(v, bool):  # JSON `true` == 1 in Python; it is not version 1
            raise ValueError("schema_version must be an integer")
        return v

    @field_validator("images")
    @classmethod
    def _images_are_s3(cls, v: list[str]) -> list[str]:
        for uri in v:
            ImageRef.parse(uri)
        return v

    @property
    def image_refs(self) -> list[ImageRef]:
        return [ImageRef.parse(u) for u in self.images]

    @property
    def modality(self) -> Modality:
        return modality_of(self.text, bool(self.images))


class Scores(BaseModel):
    """Engine scores. ``p_unsafe`` is a probability in [0, 1] when the engine can give one."""

    p_unsafe: float | None = None
    category_similarity: float | None = None


class VerdictEvent(BaseModel):
    """One moderation decision for one post (schema v1)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    post_id: str
    author_id: str
    modality: Modality
    # True/False is the engine's decision; None means the engine abstained (it could not see this
    # content, e.g. the CPU baseline on an image-only post) and the post needs another judge.
    safe: bool | None
    category: str | None = None
    category_name: str | None = None
    subcategory: str | None = None
    subcategory_name: str | None = None
    novel_risk: str | None = None
    abstained_reason: str | None = None
    parse_error: bool = False
    reasoning: str | None = None
    raw_output: str | None = None
    scores: Scores = Field(default_factory=Scores)
    engine: str
    model_version: str
    policy_version: str
    content_hash: str
    cache_hit: bool
    latency_ms: float
    source_topic: str
    source_partition: int
    source_offset: int
    post_created_at: datetime
    decided_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class DeadLetterEvent(BaseModel):
    """A post that could not be moderated, with the reason and the original bytes (schema v1)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    post_id: str | None = None
    error_code: ErrorCode
    error_class: str
    message: str
    source_topic: str
    source_partition: int
    source_offset: int
    original_key_b64: str | None = None
    # the original value, or its first GUARDSTREAM_DLQ_MAX_ORIGINAL_BYTES when it is larger (a dead letter
    # must always fit in a broker message); size and sha256 always describe the whole original
    original_value_b64: str
    original_value_size: int | None = None
    original_value_sha256: str | None = None
    original_value_truncated: bool = False
    failed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @staticmethod
    def encode_bytes(raw: bytes | None) -> str | None:
        return None if raw is None else base64.b64encode(raw).decode("ascii")

    def original_value(self) -> bytes:
        return base64.b64decode(self.original_value_b64)


class DecisionSummary(BaseModel):
    """The parts of a decision an auditor compares, with the exact versions that produced it."""

    safe: bool | None
    category: str | None = None
    subcategory: str | None = None
    novel_risk: str | None = None
    p_unsafe: float | None = None
    engine: str
    model_version: str
    policy_version: str
    decided_at: datetime | None = None
    dead_letter_code: ErrorCode | None = None

    @property
    def label(self) -> str:
        if self.dead_letter_code is not None:
            return f"error:{self.dead_letter_code.value}"
        if self.safe is None:
            return "abstain"
        if self.safe:
            return "safe"
        return self.subcategory or self.category or "novel"


class AuditRecord(BaseModel):
    """One post re-moderated by a replay: the original decision next to today's (schema v1)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    replay_id: str
    post_id: str | None
    author_id: str | None = None
    source_topic: str
    source_partition: int
    source_offset: int
    source_timestamp_ms: int | None = None
    original: DecisionSummary | None  # None: no verdict for this post on the verdicts topic
    replayed: DecisionSummary
    changed: bool
    changes: list[str]  # e.g. safe_to_unsafe, unsafe_to_safe, category_changed, novel_risk_added
    replayed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ReviewEvent(BaseModel):
    """A human reviewer's label for a post (schema v1). Human labels override model labels in exports."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    post_id: Annotated[str, Field(min_length=1, max_length=256)]
    unsafe: bool
    category: str | None = None  # taxonomy id (C*S* or C*) when the risk is in the taxonomy
    novel_risk: str | None = None  # corrected/new description when it is not
    reviewer_id: Annotated[str, Field(min_length=1)]
    reviewed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    note: str | None = None


class WindowCount(BaseModel):
    window_start: datetime
    count: int


class AlertEvent(BaseModel):
    """An emerging-risk cluster crossed the alert thresholds (schema v1)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    alert_id: str
    cluster_id: str
    representative: str  # the medoid description
    examples: list[str]  # up to k post ids
    example_descriptions: list[str]
    size: int
    counts_per_window: list[WindowCount]
    window_seconds: int
    growth: float  # current window vs trailing baseline
    distinct_authors: int
    modalities: dict[str, int]
    first_seen: datetime
    last_seen: datetime
    level: int  # 1 on first alert; +1 on each escalation
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def to_json_bytes(model: BaseModel) -> bytes:
    return model.model_dump_json(exclude_none=False).encode("utf-8")


def json_schemas() -> dict[str, dict[str, Any]]:
    return {
        "post_event.v1": PostEvent.model_json_schema(),
        "verdict_event.v1": VerdictEvent.model_json_schema(),
        "dead_letter_event.v1": DeadLetterEvent.model_json_schema(),
        "audit_record.v1": AuditRecord.model_json_schema(),
        "review_event.v1": ReviewEvent.model_json_schema(),
        "alert_event.v1": AlertEvent.model_json_schema(),
    }
