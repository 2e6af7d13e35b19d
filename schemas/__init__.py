"""Versioned event models for every topic guardstream reads or writes.

Every event carries ``schema_version``. Readers accept the versions listed in
``SUPPORTED_POST_VERSIONS``; anything else is a dead letter, never a crash.
JSON Schema exports live in ``schemas/json/`` (regenerate with
``python -m schemas.export``; a test fails when they drift).
"""

from schemas.events import (
    SUPPORTED_POST_VERSIONS,
    DeadLetterEvent,
    ErrorCode,
    ImageRef,
    Modality,
    PostEvent,
    VerdictEvent,
)

__all__ = [
    "SUPPORTED_POST_VERSIONS",
    "DeadLetterEvent",
    "ErrorCode",
    "ImageRef",
    "Modality",
    "PostEvent",
    "VerdictEvent",
]
