from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import DecodeError, decode_post
from schemas.events import ErrorCode, ImageRef, Modality
from schemas.export import OUT_DIR, render


def _post(**kw: object) -> bytes:
    # a fixed time: the value is part of the parametrized test ids, which must be the same in every
    # collecting process (pytest-xdist workers compare them)
    obj: dict[str, object] = {"post_id": "p1", "author_id": "a1", "created_at": "2026-01-01T00:00:00+00:00"}
    obj.update(kw)
    return json.dumps(obj).encode()


def test_valid_post_modalities() -> None:
    assert decode_post(_post(text="hi")).modality is Modality.TEXT
    assert decode_post(_post(images=["s3://b-1/k.png"])).modality is Modality.IMAGE
    p = decode_post(_post(text="hi", images=["s3://bucket/a/b c.png"]))
    assert p.modality is Modality.TEXT_IMAGE
    assert p.image_refs == [ImageRef(bucket="bucket", key="a/b c.png")]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", ErrorCode.INVALID_JSON),
        (b"{nope", ErrorCode.INVALID_JSON),
        (b"\xff\xfe", ErrorCode.INVALID_JSON),
        (b"[1,2]", ErrorCode.INVALID_EVENT),
        (_post(schema_version=2, text="x"), ErrorCode.UNSUPPORTED_SCHEMA_VERSION),
        (_post(schema_version="1", text="x"), ErrorCode.UNSUPPORTED_SCHEMA_VERSION),
        (_post(schema_version=True, text="x"), ErrorCode.UNSUPPORTED_SCHEMA_VERSION),
        (_post(text=None), ErrorCode.EMPTY_POST),
        (_post(text="   "), ErrorCode.EMPTY_POST),
        (_post(text="x" * 20_001), ErrorCode.TEXT_TOO_LONG),
        (_post(text="x", images=["http://169.254.169.254/latest"]), ErrorCode.IMAGE_REF_INVALID),
        (_post(text="x", images=["s3://UPPER/k"]), ErrorCode.IMAGE_REF_INVALID),
        (_post(text="x", images=["s3://b/k"] * 5), ErrorCode.IMAGE_REF_INVALID),
        (_post(text=5), ErrorCode.INVALID_EVENT),
        (_post(text="x", unknown_field=1), ErrorCode.INVALID_EVENT),
        (json.dumps({"post_id": "p", "text": "x"}).encode(), ErrorCode.INVALID_EVENT),
        (_post(text="x", created_at="yesterday"), ErrorCode.INVALID_EVENT),
    ],
)
def test_bad_events_get_stable_codes(raw: bytes, code: ErrorCode) -> None:
    with pytest.raises(DecodeError) as ei:
        decode_post(raw)
    assert ei.value.code is code


def test_post_id_is_kept_on_errors_when_present() -> None:
    with pytest.raises(DecodeError) as ei:
        decode_post(_post(schema_version=9, text="x"))
    assert ei.value.post_id == "p1"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decode_never_raises_unexpected_on_bytes(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_post(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "post_id",
                "author_id",
                "created_at",
                "text",
                "images",
                "schema_version",
                "metadata",
                "locale",
                "x",
            ]
        ),
        json_values,
        max_size=8,
    )
)
def test_decode_never_raises_unexpected_on_json_objects(obj: dict[str, object]) -> None:
    try:
        post = decode_post(json.dumps(obj).encode())
    except DecodeError as exc:
        assert isinstance(exc.code, ErrorCode)
    else:
        assert post.post_id and post.author_id


def test_exported_json_schemas_are_current() -> None:
    for fname, text in render().items():
        assert (OUT_DIR / fname).read_text() == text, f"{fname} is stale: run python -m schemas.export"
