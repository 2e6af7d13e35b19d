"""Decoding raw topic bytes into ``PostEvent`` with stable error codes (never raises anything else)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import ValidationError

from schemas.errors import RecordError
from schemas.events import MAX_TEXT_CHARS, SUPPORTED_POST_VERSIONS, ErrorCode, PostEvent

MAX_EVENT_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class DecodeError(RecordError):
    """The bytes are not a valid post (``code`` says how): the record is dead-lettered."""

    code: ErrorCode
    message: str
    post_id: str | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def decode_post(raw: bytes | None) -> PostEvent:
    """Parse and validate one posts-topic value. Raises ``DecodeError`` and nothing else."""
    if raw is None or len(raw) == 0:
        raise DecodeError(ErrorCode.INVALID_JSON, "empty message value")
    if len(raw) > MAX_EVENT_BYTES:
        raise DecodeError(ErrorCode.INVALID_EVENT, f"event is {len(raw)} bytes, limit {MAX_EVENT_BYTES}")
    try:  # fast path: a valid v1 post parses and validates in one pass in pydantic-core
        post = PostEvent.model_validate_json(raw)
    except ValidationError:
        pass  # classify the failure below, with a stable error code
    else:
        return _check_content(post)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DecodeError(ErrorCode.INVALID_JSON, f"not UTF-8 JSON: {exc}"[:500]) from None
    if not _is_unicode(obj):
        # json.loads accepts "\ud800" escapes; pydantic's JSON parser (the fast path above) and every
        # consumer downstream (UTF-8 Kafka keys and events, tokenizers, HTTP engines) do not. Such a
        # string is not Unicode text (RFC 8259 §8.2, RFC 7493 §2.1), so the post is refused here, once,
        # with a stable code, rather than each component learning to carry it.
        raise DecodeError(ErrorCode.INVALID_JSON, "a string contains an unpaired UTF-16 surrogate escape")
    if not isinstance(obj, dict):
        raise DecodeError(ErrorCode.INVALID_EVENT, f"expected a JSON object, got {type(obj).__name__}")
    post_id = obj.get("post_id") if isinstance(obj.get("post_id"), str) else None
    version = obj.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_POST_VERSIONS:
        raise DecodeError(
            ErrorCode.UNSUPPORTED_SCHEMA_VERSION,
            f"schema_version {version!r} not in {sorted(SUPPORTED_POST_VERSIONS)}",
            post_id,
        )
    try:
        post = PostEvent.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        code = ErrorCode.IMAGE_REF_INVALID if loc.startswith("images") else ErrorCode.INVALID_EVENT
        raise DecodeError(code, f"{loc}: {first['msg']}"[:500], post_id) from None
    return _check_content(post)


def _check_content(post: PostEvent) -> PostEvent:
    if post.text is not None and len(post.text) > MAX_TEXT_CHARS:
        raise DecodeError(
            ErrorCode.TEXT_TOO_LONG, f"text is {len(post.text)} chars, limit {MAX_TEXT_CHARS}", post.post_id
        )
    if not (post.text and post.text.strip()) and not post.images:
        raise DecodeError(ErrorCode.EMPTY_POST, "post has neither text nor images", post.post_id)
    return post


def _is_unicode(obj: object) -> bool:
    """False if any string (key or value) in a parsed JSON document holds a lone surrogate."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
