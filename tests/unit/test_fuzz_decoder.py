"""Mutation fuzz of the image decoder over real image bytes (issue 13, item 1).

Seeds are real files of every format Pillow can write here — the allowed ones (JPEG with EXIF, PNG in
8/16-bit and palette modes, WebP, animated GIF) and refused ones (BMP, TIFF, IM, DDS, ICO, PCX...) — and
hypothesis mutates them: byte flips, overwritten runs, truncations, duplicated slices, and header swaps
(one format's magic on another's body). The property: ``decode_image`` either returns a bounded 8-bit
RGB image or raises ``MediaError`` with a stable ``ErrorCode`` — never anything else. Bounded for CI:
~600 examples in well under 20 s on a 2-core machine.
"""

from __future__ import annotations

import io
import time
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from schemas.events import ErrorCode
from workers.media import ALLOWED_FORMATS, MAX_SIDE, DecodeBudget, MediaError, decode_image

CAP = 40_000_000
TARGET = 64 * 64  # small target: the fuzz exercises the downscale path on every seed


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) % 256)], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


@cache
def seeds() -> dict[str, bytes]:
    rgb = _gradient(96, 72)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = {
        "jpeg": _save(rgb, "JPEG", quality=80, exif=exif.tobytes()),
        "jpeg_progressive": _save(rgb, "JPEG", progressive=True),
        "jpeg_cmyk": _save(rgb.convert("CMYK"), "JPEG"),
        "png": _save(rgb, "PNG"),
        "png_rgba": _save(rgb.convert("RGBA"), "PNG"),
        "png_16bit": _save(Image.fromarray((np.arange(96 * 72, dtype=np.uint16) * 9).reshape(72, 96)), "PNG"),
        "png_palette": _save(rgb.convert("P"), "PNG", transparency=0),
        "webp": _save(rgb, "WEBP", quality=70),
        "webp_lossless": _save(rgb.convert("RGBA"), "WEBP", lossless=True),
    }
    frames = [_gradient(40, 30).rotate(a) for a in (0, 90, 180)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=20, loop=0)
    out["gif_animated"] = buf.getvalue()
    for name, fmt, mode in (
        ("bmp", "BMP", "RGB"),
        ("tiff", "TIFF", "RGB"),
        ("im", "IM", "RGB"),
        ("dds", "DDS", "RGBA"),
        ("ico", "ICO", "RGBA"),
        ("pcx", "PCX", "RGB"),
        ("tga", "TGA", "RGB"),
        ("ppm", "PPM", "RGB"),
    ):
        try:
            out[name] = _save(rgb.convert(mode), fmt)
        except (OSError, KeyError, ValueError):  # a codec not built into this Pillow
            continue
    return out


ALLOWED_SEEDS = ("jpeg", "jpeg_progressive", "jpeg_cmyk", "png", "png_rgba", "png_16bit", "png_palette")
ALLOWED_SEEDS += ("webp", "webp_lossless", "gif_animated")
INSERTS = [b"\xff" * 8, b"\x00" * 8, b"\x7f\xff\xff\xff", b"\xff\xd9"]
MAGICS = [
    b"\xff\xd8\xff\xe0",
    b"\x89PNG\r\n\x1a\n",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"DDS |\x00\x00\x00",
    b"Image type: RGB image\r\n",
    b"%!PS-Adobe-3.0 EPSF-3.0\n",
    b"\x00\x00\x00\x1cftypavif",
]


def _check(data: bytes) -> None:
    try:
        img = decode_image(data, CAP, target_pixels=TARGET, budget=DecodeBudget(64 << 20))
    except MediaError as exc:
        assert isinstance(exc.code, ErrorCode)
        return
    assert img.mode == "RGB"
    w, h = img.size
    assert w * h <= TARGET and max(w, h) <= MAX_SIDE


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    seed = bytearray(seeds()[draw(st.sampled_from(sorted(seeds())))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "overwrite", "truncate", "duplicate", "swap_header", "insert"]))
        n = len(seed)
        if n == 0:
            break
        pos = draw(st.integers(0, n - 1))
        if op == "flip":
            seed[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            junk = draw(st.binary(min_size=1, max_size=16))
            seed[pos : pos + len(junk)] = junk
        elif op == "truncate":
            del seed[pos:]
        elif op == "duplicate":
            end = min(n, pos + draw(st.integers(1, 256)))
            seed[pos:pos] = seed[pos:end]
        elif op == "swap_header":
            magic = draw(st.sampled_from(MAGICS))
            seed[: len(magic)] = magic
        else:
            seed[pos:pos] = draw(st.sampled_from(INSERTS))
    return bytes(seed)


def test_every_allowed_seed_decodes() -> None:
    """The seeds are real images: the allowed ones decode (so the fuzz starts from the valid paths)."""
    for name in ALLOWED_SEEDS:
        img = decode_image(seeds()[name], CAP, target_pixels=TARGET)
        assert img.mode == "RGB", name


@pytest.mark.parametrize("name", ["bmp", "tiff", "im", "dds", "ico", "pcx", "tga", "ppm"])
def test_formats_off_the_allow_list_are_refused_unparsed(name: str) -> None:
    data = seeds().get(name)
    if data is None:
        pytest.skip(f"this Pillow cannot write {name}")
    with pytest.raises(MediaError) as ei:
        decode_image(data, CAP)
    assert ei.value.code is ErrorCode.IMAGE_NOT_AN_IMAGE
    assert "accepted format" in ei.value.message


def test_eps_is_refused_without_running_ghostscript(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from PIL import EpsImagePlugin

    def no_gs(*_a: object, **_k: object) -> None:
        raise AssertionError("the decoder tried to run Ghostscript")

    monkeypatch.setattr(subprocess, "check_call", no_gs)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_gs)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n%%EOF\n"
    with pytest.raises(MediaError) as ei:
        decode_image(eps, CAP)
    assert ei.value.code is ErrorCode.IMAGE_NOT_AN_IMAGE
    assert "EPS" not in ALLOWED_FORMATS


@settings(
    max_examples=600,
    deadline=None,
    derandomize=True,  # the same 600 inputs on every CI run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated())
def test_decoder_is_total_on_mutated_images(data: bytes) -> None:
    _check(data)


def test_fuzz_budget_is_bounded() -> None:
    """The fuzz above must stay CI-sized: time a fixed slice of it."""
    t0 = time.monotonic()
    for name, data in seeds().items():
        for cut in range(8, len(data), max(1, len(data) // 12)):
            _check(data[:cut])
        _check(data[:4] + bytes(reversed(data[4:])))
        if name in ALLOWED_SEEDS:
            for magic in MAGICS:
                _check(magic + data[len(magic) :])
    assert time.monotonic() - t0 < 10.0
