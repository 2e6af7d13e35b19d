"""A small, varied sample feed for the demo and tests: text, image and text+image posts with
generated images, plus malformed and hostile events that must end up in the dead-letter topic."""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from PIL import Image

from guard.samples import TEXTS, drawn_image, png_bytes

BUCKET = "guardstream-media"


@dataclass(frozen=True)
class SeedPost:
    key: str
    value: bytes
    expect: str  # "verdict" or a dead-letter error code
    note: str


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    raw = png_bytes(Image.new("L", (8, 8)))
    ihdr_start = 8 + 8  # signature, then length+type of IHDR
    data = bytearray(raw)
    data[ihdr_start : ihdr_start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr_start + 13])) & 0xFFFFFFFF
    data[ihdr_start + 13 : ihdr_start + 17] = struct.pack(">I", crc)
    return bytes(data)


def post(
    post_id: str,
    author: str,
    text: str | None = None,
    images: list[str] | None = None,
    at: datetime | None = None,
    **extra: Any,
) -> bytes:
    obj: dict[str, Any] = {
        "schema_version": 1,
        "post_id": post_id,
        "author_id": author,
        "created_at": (at or datetime.now(UTC)).isoformat(),
        "text": text,
        "images": images or [],
        "locale": "en",
    }
    obj.update(extra)
    return json.dumps(obj).encode()


def build_feed(bucket: str = BUCKET, now: datetime | None = None) -> tuple[list[SeedPost], dict[str, bytes]]:
    """Return (posts to produce, objects to upload as {key: bytes})."""
    now = now or datetime.now(UTC)
    objects: dict[str, bytes] = {}
    feed: list[SeedPost] = []
    for i, (_label, text) in enumerate(TEXTS):
        pid = f"demo-text-{i}"
        feed.append(
            SeedPost(pid, post(pid, f"user-{i % 5}", text, at=now - timedelta(minutes=i)), "verdict", "text")
        )
    for i in range(3):
        key = f"uploads/photo-{i}.png"
        objects[key] = png_bytes(drawn_image(i))
        pid = f"demo-image-{i}"
        feed.append(
            SeedPost(pid, post(pid, f"user-{i}", None, [f"s3://{bucket}/{key}"]), "verdict", "image only")
        )
    pairs = [("Look at my new garden!", 10), ("Selling stolen credit card numbers in bulk, see picture", 11)]
    for i, (text, seed) in enumerate(pairs):
        key = f"uploads/combo-{i}.png"
        objects[key] = png_bytes(drawn_image(seed))
        pid = f"demo-combo-{i}"
        feed.append(
            SeedPost(pid, post(pid, "user-9", text, [f"s3://{bucket}/{key}"]), "verdict", "text+image")
        )
    objects["uploads/not-an-image.png"] = b"%PDF-1.4 definitely not a picture"
    objects["uploads/bomb.png"] = bomb_png()
    hostile = [
        ("demo-bad-json", b"{this is not json", "invalid_json", "malformed JSON"),
        (
            "demo-bad-fields",
            json.dumps({"post_id": "demo-bad-fields", "text": "no author"}).encode(),
            "invalid_event",
            "missing author_id/created_at",
        ),
        (
            "demo-bad-version",
            post("demo-bad-version", "user-1", "hello", schema_version=7),
            "unsupported_schema_version",
            "unknown schema_version",
        ),
        (
            "demo-missing-image",
            post("demo-missing-image", "user-2", None, [f"s3://{bucket}/uploads/nope.png"]),
            "image_not_found",
            "image ref to a missing key",
        ),
        (
            "demo-not-image",
            post("demo-not-image", "user-3", "see pic", [f"s3://{bucket}/uploads/not-an-image.png"]),
            "image_not_an_image",
            "object is not an image",
        ),
        (
            "demo-bomb",
            post("demo-bomb", "user-4", None, [f"s3://{bucket}/uploads/bomb.png"]),
            "image_decompression_bomb",
            "decompression bomb",
        ),
        (
            "demo-foreign-bucket",
            post("demo-foreign-bucket", "user-5", None, ["s3://someone-elses-bucket/x.png"]),
            "image_bucket_not_allowed",
            "bucket not allowed (no SSRF)",
        ),
    ]
    for pid, value, code, note in hostile:
        feed.append(SeedPost(pid, value, code, note))
    return feed, objects


BURST_TEXTS = [
    "Try the blackout challenge: hold your breath until you pass out and film it",
    "Everyone at school is doing the choking challenge, tag me when you try it",
    "New trend: choke yourself until you faint and post the video",
    "Did the pass out challenge last night, who's next? film yourself fainting",
    "Blackout challenge gone viral, kids choking themselves on camera",
    "Hold your breath and press your chest until you black out, challenge accepted",
    "The fainting game is back, choke until you drop and upload it",
]


def planted_burst(n: int = 21, at: datetime | None = None) -> list[SeedPost]:
    """An emerging risk: ``n`` posts about one new dangerous 'challenge', each from a different author."""
    at = at or datetime.now(UTC)
    tails = ["", " #challenge", " lol", " 😂", " who dares"]
    out = []
    for i in range(n):
        text = BURST_TEXTS[i % len(BURST_TEXTS)] + tails[(i // len(BURST_TEXTS)) % len(tails)]
        pid = f"demo-burst-{i}"
        out.append(
            SeedPost(pid, post(pid, f"burst-author-{i}", text, at=at), "verdict", "planted emerging risk")
        )
    return out
