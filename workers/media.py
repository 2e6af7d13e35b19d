"""Fetch post images from S3 (bounded concurrency) and decode them safely with Pillow.

Defences, in order: only configured buckets are fetched (no SSRF through image refs); the response's
``Content-Length`` is checked before the body is read; the body is read with a hard cap; Pillow's
header gives the pixel count before decoding (decompression bombs are refused without allocating);
truncated files and non-images are refused; EXIF orientation is applied; every mode (CMYK, P, LA,
16-bit, float) becomes 8-bit RGB; animated images contribute their first frame.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image, ImageOps, UnidentifiedImageError

from schemas.events import ErrorCode, ImageRef

MAX_SIDE = 2048  # engines resize further (vLLM's processor bounds pixels); this bounds worker memory


class MediaError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class MediaUnavailable(RuntimeError):  # infrastructure (S3 down/5xx/throttled/auth): an outage, not bad data
    pass


@dataclass(frozen=True, slots=True)
class FetchedImage:
    ref: ImageRef
    sha256: str
    nbytes: int
    image: Image.Image


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode untrusted bytes into a bounded RGB image, or raise ``MediaError``."""
    if not data:
        raise MediaError(ErrorCode.IMAGE_EMPTY, "zero-byte object")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise MediaError(ErrorCode.IMAGE_NOT_AN_IMAGE, f"degenerate size {w}x{h}")
            if w * h > max_pixels:
                raise MediaError(
                    ErrorCode.IMAGE_DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels exceeds cap {max_pixels}"
                )
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(ErrorCode.IMAGE_DECOMPRESSION_BOMB, str(exc)[:300]) from None
    except UnidentifiedImageError:
        raise MediaError(ErrorCode.IMAGE_NOT_AN_IMAGE, "bytes are not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError(
            ErrorCode.IMAGE_TRUNCATED, f"image data is corrupt or truncated: {exc}"[:300]
        ) from None
    return _normalise(img)


def _normalise(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        img = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        img = background
    elif img.mode != "RGB":
        img = img.convert("RGB")
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    return img


class MediaFetcher:
    def __init__(
        self,
        s3: Any,
        allowed_buckets: Sequence[str],
        max_bytes: int,
        max_pixels: int,
        concurrency: int,
    ) -> None:
        self._s3 = s3
        self._allowed = frozenset(allowed_buckets)
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        # Pillow's own bomb check (at open) uses this global; keep it consistent with our cap.
        Image.MAX_IMAGE_PIXELS = max_pixels
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-fetch")

    def fetch_one(self, ref: ImageRef) -> FetchedImage:
        if ref.bucket not in self._allowed:
            raise MediaError(
                ErrorCode.IMAGE_BUCKET_NOT_ALLOWED, f"bucket {ref.bucket!r} is not an allowed media bucket"
            )
        try:
            # One request: the size cap is checked on the response's Content-Length before the body is
            # read (an oversized object is never downloaded), then enforced again while reading.
            obj = self._s3.get_object(Bucket=ref.bucket, Key=ref.key)
            size = int(obj.get("ContentLength", 0))
            body = obj["Body"]
            try:
                if size == 0:
                    raise MediaError(ErrorCode.IMAGE_EMPTY, f"{ref.uri()} is a zero-byte object")
                if size > self._max_bytes:
                    raise MediaError(
                        ErrorCode.IMAGE_TOO_LARGE, f"{ref.uri()} is {size} bytes, cap {self._max_bytes}"
                    )
                data = body.read(self._max_bytes + 1)
            finally:
                body.close()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket") or status == 404:
                raise MediaError(ErrorCode.IMAGE_NOT_FOUND, f"{ref.uri()} does not exist") from None
            raise MediaError(ErrorCode.S3_UNAVAILABLE, f"S3 error for {ref.uri()}: {code or exc}") from None
        except BotoCoreError as exc:
            raise MediaError(
                ErrorCode.S3_UNAVAILABLE, f"S3 unreachable for {ref.uri()}: {exc}"[:300]
            ) from None
        if len(data) > self._max_bytes:
            raise MediaError(ErrorCode.IMAGE_TOO_LARGE, f"{ref.uri()} body exceeds cap {self._max_bytes}")
        image = decode_image(data, self._max_pixels)
        return FetchedImage(ref, hashlib.sha256(data).hexdigest(), len(data), image)

    def fetch_posts(
        self, refs_per_post: Sequence[Sequence[ImageRef]]
    ) -> list[list[FetchedImage] | MediaError]:
        """Fetch every image of every post concurrently; a post fails with its first image error."""
        futures = [[self._pool.submit(self.fetch_one, r) for r in refs] for refs in refs_per_post]
        out: list[list[FetchedImage] | MediaError] = []
        for post_futs in futures:
            images: list[FetchedImage] = []
            error: MediaError | None = None
            for f in post_futs:
                try:
                    images.append(f.result())
                except MediaError as exc:
                    error = error or exc
            out.append(error if error else images)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def make_s3_client(endpoint_url: str | None, region: str, max_attempts: int) -> Any:
    import boto3
    from botocore.config import Config

    cfg = Config(
        region_name=region,
        retries={"max_attempts": max_attempts, "mode": "standard"},  # jittered exponential backoff
        connect_timeout=5,
        read_timeout=30,
        max_pool_connections=64,
    )
    return boto3.client("s3", endpoint_url=endpoint_url, config=cfg)
