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
    bucket: str = Field(description="S3 bucket name (must be in GUARDSTREAM_ALLOWED_BUCKETS to be fetched).")
    key: str = Field(description="Object key inside the bucket.")

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

    schema_version: Literal[1] = Field(
        1, description="Version of this event's schema; readers dead-letter versions they do not support."
    )
    post_id: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        description="Producer-assigned unique post id: the Kafka key and every downstream event's join key."
    )
    author_id: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        description="Id of the post's author (alerts count distinct authors; audit exports filter on it)."
    )
    created_at: datetime = Field(
        description="When the post was created (ISO-8601 with a zone); end-to-end latency starts here."
    )
    text: str | None = Field(
        None, description="The post's text, at most 20,000 characters; null or blank for an image-only post."
    )
    images: Annotated[list[str], Field(max_length=MAX_IMAGES_PER_POST)] = Field(
        default_factory=list,
        description="Up to 4 image references, each s3://bucket/key in an allowed bucket.",
    )
    locale: str | None = Field(
        None, description="Optional BCP-47 locale of the text (informational; not used for the decision)."
    )
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Free-form string metadata carried alongside the post (not used for the decision).",
    )

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

    p_unsafe: float | None = Field(
        None,
        description="Probability that the post is unsafe, in [0, 1]; null when the engine cannot give one.",
    )
    category_similarity: float | None = Field(
        None, description="CPU engine only: cosine similarity to the nearest taxonomy exemplar."
    )


class VerdictEvent(BaseModel):
    """One moderation decision for one post (schema v1)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = Field(1, description="Version of this event's schema.")
    post_id: str = Field(description="Id of the moderated post (also the record key).")
    author_id: str = Field(description="Author of the moderated post.")
    modality: Modality = Field(description="What the engine judged: text, image or text_image.")
    # True/False is the engine's decision; None means the engine abstained (it could not see this
    # content, e.g. the CPU baseline on an image-only post) and the post needs another judge.
    safe: bool | None = Field(
        description="The engine's decision: true safe, false unsafe, null abstained (see abstained_reason)."
    )
    category: str | None = Field(
        None, description="Taxonomy main category id (e.g. C9) when unsafe and in the taxonomy."
    )
    category_name: str | None = Field(None, description="Human-readable name of category.")
    subcategory: str | None = Field(
        None, description="Taxonomy subcategory id (e.g. C9S1) when the engine gave one."
    )
    subcategory_name: str | None = Field(None, description="Human-readable name of subcategory.")
    novel_risk: str | None = Field(
        None,
        description="Short description of an out-of-taxonomy risk; also sent to the novel-risks topic.",
    )
    abstained_reason: str | None = Field(
        None, description="Why the engine abstained (safe is null), e.g. an image the CPU engine cannot see."
    )
    parse_error: bool = Field(
        False, description="True when the engine's output did not parse (raw_output kept when published)."
    )
    reasoning: str | None = Field(
        None, description="The engine's reasoning; published only with GUARDSTREAM_PUBLISH_REASONING=true."
    )
    raw_output: str | None = Field(
        None, description="The engine's raw output; published only with GUARDSTREAM_PUBLISH_REASONING=true."
    )
    scores: Scores = Field(
        default_factory=Scores, description="Engine scores (calibrated p_unsafe where available)."
    )
    engine: str = Field(description="Engine that decided (e.g. cpu-minilm, vllm).")
    model_version: str = Field(description="Exact model/checkpoint version that decided.")
    policy_version: str = Field(
        description="Version (hash) of the taxonomy and prompts the decision was made under."
    )
    content_hash: str = Field(
        description="Hash of the judged content (text and image bytes); the verdict cache key."
    )
    cache_hit: bool = Field(
        description="True when the verdict came from the Redis cache rather than the engine."
    )
    latency_ms: float = Field(description="Time from consuming the post to the decision, in milliseconds.")
    source_topic: str = Field(description="Topic the post was read from.")
    source_partition: int = Field(description="Partition the post was read from.")
    source_offset: int = Field(description="Offset of the post in its partition.")
    post_created_at: datetime = Field(
        description="The post's created_at, copied for latency and time-range queries."
    )
    decided_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="When the decision was made (UTC)."
    )


class DeadLetterEvent(BaseModel):
    """A post that could not be moderated, with the reason and the original bytes (schema v1)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = Field(1, description="Version of this event's schema.")
    post_id: str | None = Field(
        None, description="Id of the post when it could be read from the bytes; null otherwise."
    )
    error_code: ErrorCode = Field(description="Stable reason code; alerting and redrive key on it.")
    error_class: str = Field(
        description="Python class of the underlying error (diagnostics only; not stable)."
    )
    message: str = Field(description="Human-readable error message (not stable).")
    source_topic: str = Field(description="Topic the post was read from.")
    source_partition: int = Field(description="Partition the post was read from.")
    source_offset: int = Field(description="Offset of the post in its partition.")
    original_key_b64: str | None = Field(
        None, description="The original record key, base64; null when the record had none."
    )
    original_value_b64: str = Field(
        description="The original record value, base64 (for inspection or redrive); only its first "
        "GUARDSTREAM_DLQ_MAX_ORIGINAL_BYTES when it is larger (a dead letter must always fit in a message)."
    )
    original_value_size: int | None = Field(
        None, description="Size in bytes of the whole original value (also when only a prefix is kept)."
    )
    original_value_sha256: str | None = Field(None, description="sha256 (hex) of the whole original value.")
    original_value_truncated: bool = Field(
        False, description="True when original_value_b64 holds only a prefix of the original value."
    )
    failed_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="When the post was dead-lettered (UTC)."
    )

    @staticmethod
    def encode_bytes(raw: bytes | None) -> str | None:
        return None if raw is None else base64.b64encode(raw).decode("ascii")

    def original_value(self) -> bytes:
        return base64.b64decode(self.original_value_b64)


class DecisionSummary(BaseModel):
    """The parts of a decision an auditor compares, with the exact versions that produced it."""

    safe: bool | None = Field(description="true safe, false unsafe, null abstained or dead-lettered.")
    category: str | None = Field(None, description="Taxonomy main category id when unsafe.")
    subcategory: str | None = Field(None, description="Taxonomy subcategory id when given.")
    novel_risk: str | None = Field(None, description="Out-of-taxonomy risk description when given.")
    p_unsafe: float | None = Field(None, description="The engine's probability of unsafe, when it gave one.")
    engine: str = Field(description="Engine that decided ('worker' for a dead letter).")
    model_version: str = Field(description="Exact model version that decided ('-' for a dead letter).")
    policy_version: str = Field(
        description="Policy (taxonomy + prompts) version of the decision ('-' for a dead letter)."
    )
    decided_at: datetime | None = Field(None, description="When the decision (or dead letter) was made.")
    dead_letter_code: ErrorCode | None = Field(
        None, description="Error code when the post was dead-lettered instead of decided."
    )

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

    schema_version: Literal[1] = Field(1, description="Version of this event's schema.")
    replay_id: str = Field(description="Id of the replay run; records are keyed replay_id:partition:offset.")
    post_id: str | None = Field(
        description="Id of the replayed post; null when the record was not a readable post."
    )
    author_id: str | None = Field(None, description="Author of the replayed post, when known.")
    source_topic: str = Field(description="Topic the replayed post was read from.")
    source_partition: int = Field(description="Partition of the replayed post.")
    source_offset: int = Field(description="Offset of the replayed post.")
    source_timestamp_ms: int | None = Field(
        None, description="Kafka timestamp of the replayed post record (ms since the epoch)."
    )
    original: DecisionSummary | None = Field(
        description="The live decision (latest verdict or dead letter); null when there was none."
    )
    replayed: DecisionSummary = Field(description="The decision the replay's engine and policy made now.")
    changed: bool = Field(description="True when the replayed decision differs from the original.")
    changes: list[str] = Field(
        description="Kinds of change: safe_to_unsafe, unsafe_to_safe, category_changed, novel_risk_added, ..."
    )
    replayed_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="When the post was replayed (UTC)."
    )


class ReviewEvent(BaseModel):
    """A human reviewer's label for a post (schema v1). Human labels override model labels in exports."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = Field(1, description="Version of this event's schema.")
    post_id: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        description="Id of the reviewed post."
    )
    unsafe: bool = Field(description="The reviewer's label: true unsafe, false safe.")
    category: str | None = Field(
        None, description="Taxonomy id (C*S* or C*) when the risk is in the taxonomy."
    )
    novel_risk: str | None = Field(
        None, description="Corrected or new description when the risk is not in the taxonomy."
    )
    reviewer_id: Annotated[str, Field(min_length=1)] = Field(description="Who reviewed the post.")
    reviewed_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC),
        description="When the review was made (UTC); the latest review of a post wins.",
    )
    note: str | None = Field(None, description="Free-text reviewer note.")


class WindowCount(BaseModel):
    window_start: datetime = Field(description="Start of the tumbling window (UTC).")
    count: int = Field(description="Posts in the cluster within this window.")


class AlertEvent(BaseModel):
    """An emerging-risk cluster crossed the alert thresholds (schema v1)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = Field(1, description="Version of this event's schema.")
    alert_id: str = Field(description="Unique id of this alert.")
    cluster_id: str = Field(description="Id of the emerging-risk cluster that alerted.")
    representative: str = Field(description="The cluster's medoid novel-risk description.")
    examples: list[str] = Field(description="Up to k example post ids from the cluster.")
    example_descriptions: list[str] = Field(description="Novel-risk descriptions of the example posts.")
    # Optional and added within v1: an alert without it (raised before it existed) still validates, and
    # its readers fall back to the examples.
    member_ids: list[str] | None = Field(
        None,
        description=(
            "Post ids of the cluster's members when the alert was raised, oldest first: all of them while "
            "the cluster has at most 500 members, else the 500 most recent (size is the total). Null in "
            "alerts raised before this field existed (then only examples names posts)."
        ),
    )
    size: int = Field(description="Posts in the cluster so far (the total count of members).")
    counts_per_window: list[WindowCount] = Field(description="Posts per tumbling window, oldest first.")
    window_seconds: int = Field(description="Length of a window in seconds (GUARDSTREAM_ALERT_WINDOW_S).")
    growth: float = Field(description="Current window's count over the trailing baseline.")
    distinct_authors: int = Field(description="Distinct authors among the cluster's posts.")
    modalities: dict[str, int] = Field(description="Posts per modality in the cluster.")
    first_seen: datetime = Field(description="When the cluster's first post was seen.")
    last_seen: datetime = Field(description="When the cluster's latest post was seen.")
    level: int = Field(
        description="1 on the first alert; +1 on each escalation (2x the count last alerted at)."
    )
    created_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="When the alert was raised (UTC)."
    )


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
