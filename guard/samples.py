"""Deterministic sample inputs for the engines: a few labelled texts and a drawn picture.

They live in ``guard`` (not in the worker's demo feed) so that the GPU smoke test and the benchmarks can use
them without ``guard`` depending on ``workers``; the demo feed builds its posts from them.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def drawn_image(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A deterministic synthetic picture (shapes on a gradient); ``seed`` makes each one distinct."""
    w, h = size
    img = Image.new("RGB", size)
    px = img.load()
    assert px is not None
    for y in range(h):
        for x in range(0, w, 4):
            c = ((x * 255) // w, (y * 255) // h, (seed * 37) % 256)
            for dx in range(4):
                if x + dx < w:
                    px[x + dx, y] = c
    d = ImageDraw.Draw(img)
    for i in range(3):
        x0, y0 = (seed * 53 + i * 71) % (w - 60), (seed * 29 + i * 47) % (h - 60)
        d.ellipse([x0, y0, x0 + 50, y0 + 50], fill=((seed * 91 + i * 60) % 256, 80, 160))
    return img


TEXTS: list[tuple[str, str]] = [
    ("safe", "Had a great time at the beach with the kids today!"),
    ("safe", "Anyone know a good pizza place downtown?"),
    ("safe", "Just baked cookies with grandma, recipe in the comments"),
    ("unsafe", "Selling unregistered handguns and ammo, no questions asked, DM me"),
    ("unsafe", "Buy cocaine and MDMA here, fast discreet shipping"),
    ("unsafe", "Click this link to claim your free prize, just enter your bank password"),
    ("unsafe", "Download the full new superhero movie free, pirated HD copy here"),
    ("unsafe", "Step by step guide to make ransomware that encrypts hospital files"),
]
