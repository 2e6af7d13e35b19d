"""Image decoding and S3 fetching against the real moto S3 server."""

from __future__ import annotations

import contextlib
import io
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from guard.samples import drawn_image, png_bytes
from schemas.events import ErrorCode, ImageRef
from tests.conftest import BUCKET, Services
from workers.demo.sample_feed import bomb_png
from workers.media import MAX_SIDE, MediaError, MediaFetcher, MediaUnavailable, decode_image, make_s3_client

CAP = 40_000_000


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_png_roundtrip() -> None:
    img = decode_image(png_bytes(drawn_image(1)), CAP)
    assert img.mode == "RGB" and img.size == (320, 240)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _save(Image.new("CMYK", (40, 30), (0, 255, 0, 0)), "JPEG"),
        lambda: _save(Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50), "PNG"),
        lambda: _save(Image.new("RGBA", (40, 30), (255, 0, 0, 128)), "PNG"),
        lambda: _save(Image.new("LA", (40, 30)), "PNG"),
        lambda: _save(Image.new("P", (40, 30)), "GIF", transparency=0),
        lambda: _save(Image.new("1", (40, 30)), "PNG"),
        lambda: _save(Image.new("RGB", (40, 30)), "WEBP"),
    ],
)
def test_every_mode_becomes_rgb(make) -> None:  # type: ignore[no-untyped-def]
    img = decode_image(make(), CAP)
    assert img.mode == "RGB" and img.size == (40, 30)


def test_exif_orientation_is_applied() -> None:
    src = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img = decode_image(_save(src, "JPEG", exif=exif.tobytes()), CAP)
    assert img.size == (20, 40)


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (30, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    img = decode_image(buf.getvalue(), CAP)
    r, g, b = img.getpixel((5, 5))  # type: ignore[misc]
    assert r > 200 and g < 50 and b < 50


def test_huge_images_are_downscaled() -> None:
    img = decode_image(png_bytes(Image.new("RGB", (5000, 100))), CAP)
    assert max(img.size) == MAX_SIDE


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", ErrorCode.IMAGE_EMPTY),
        (b"%PDF-1.7 not an image", ErrorCode.IMAGE_NOT_AN_IMAGE),
        (png_bytes(drawn_image(3))[:300], ErrorCode.IMAGE_TRUNCATED),
        (bomb_png(100_000, 100_000), ErrorCode.IMAGE_DECOMPRESSION_BOMB),
        (bomb_png(8_000, 8_000), ErrorCode.IMAGE_DECOMPRESSION_BOMB),  # 64 MP: over our cap, under Pillow's
    ],
)
def test_hostile_bytes_are_refused(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(MediaError) as ei:
        decode_image(data, CAP)
    assert ei.value.code is code


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_decode_is_total_on_arbitrary_bytes(data: bytes) -> None:
    try:
        img = decode_image(data, CAP)
    except MediaError as exc:
        assert isinstance(exc.code, ErrorCode)
    else:
        assert img.mode == "RGB"


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=5000), st.binary(min_size=1, max_size=8))
def test_decode_is_total_on_corrupted_pngs(pos: int, junk: bytes) -> None:
    good = bytearray(png_bytes(drawn_image(2, (64, 48))))
    pos = pos % len(good)
    good[pos : pos + len(junk)] = junk
    with contextlib.suppress(MediaError):
        img = decode_image(bytes(good), CAP)
        assert img.mode == "RGB"


@pytest.mark.integration
def test_fetch_from_real_s3(services: Services) -> None:
    s3 = services.s3_client()
    prefix = uuid.uuid4().hex
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/ok.png", Body=png_bytes(drawn_image(4)))
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/empty.png", Body=b"")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/big.png", Body=b"\x89PNG" + b"0" * 5000)
    client = make_s3_client(services.s3.endpoint, "us-east-1", 2)
    f = MediaFetcher(client, [BUCKET], max_bytes=4096, max_pixels=CAP, concurrency=4)
    try:
        res = f.fetch_posts(
            [
                [ImageRef(bucket=BUCKET, key=f"{prefix}/ok.png")],
                [ImageRef(bucket=BUCKET, key=f"{prefix}/missing.png")],
                [ImageRef(bucket=BUCKET, key=f"{prefix}/empty.png")],
                [ImageRef(bucket=BUCKET, key=f"{prefix}/big.png")],
                [ImageRef(bucket="other-bucket", key="x.png")],
                [
                    ImageRef(bucket=BUCKET, key=f"{prefix}/ok.png"),
                    ImageRef(bucket=BUCKET, key=f"{prefix}/gone.png"),
                ],
            ]
        )
    finally:
        f.close()
    ok = res[0]
    assert isinstance(ok, list) and ok[0].image.size == (320, 240) and len(ok[0].sha256) == 64
    codes = [r.code for r in res[1:] if isinstance(r, MediaError)]
    assert codes == [
        ErrorCode.IMAGE_NOT_FOUND,
        ErrorCode.IMAGE_EMPTY,
        ErrorCode.IMAGE_TOO_LARGE,
        ErrorCode.IMAGE_BUCKET_NOT_ALLOWED,
        ErrorCode.IMAGE_NOT_FOUND,
    ]


@pytest.mark.integration
def test_s3_outage_is_not_the_posts_fault() -> None:
    from infra.stack import free_port

    client = make_s3_client(f"http://127.0.0.1:{free_port()}", "us-east-1", 2)  # nothing listens there
    f = MediaFetcher(client, [BUCKET], max_bytes=4096, max_pixels=CAP, concurrency=1)
    try:
        with pytest.raises(MediaUnavailable, match="S3 unreachable"):
            f.fetch_posts([[ImageRef(bucket=BUCKET, key="k.png")]])
    finally:
        f.close()
