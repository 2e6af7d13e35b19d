"""Fetch post images from S3 (bounded concurrency) and decode them safely with Pillow.

Defences, in order: only configured buckets are fetched (no SSRF through image refs); the response's
``Content-Length`` is checked before the body is read; the body is read with a hard cap; only an
allow-list of formats is ever handed to a Pillow plugin (EPS, which shells out to Ghostscript, and the
rarely used, often fragile decoders — AVIF, DDS, IM, TIFF... — are never tried); Pillow's header gives
the pixel count and the *decoded byte size* before decoding (decompression bombs and 16-bit monsters
are refused without allocating); every decode holds a share of one decoded-bytes budget for all the
images in flight; JPEGs are decoded at a reduced DCT scale (``draft``) and every image is thumbnailed to
the engine's pixel bound *before* any mode conversion or EXIF transpose (which copy the image); every
mode (CMYK, P, LA, 16-bit, float) becomes 8-bit RGB; animated images contribute their first frame. The
whole decode runs under one guard: whatever a plugin raises becomes a ``MediaError`` with a stable code.

Errors are split by whose fault they are. ``MediaError`` (a ``RecordError``) is a property of the post
(missing object, not an image, a bomb, too large, a bucket that is not allowed): the post is dead-lettered.
``MediaUnavailable`` (an ``InfrastructureError``) is the infrastructure (S3 down, 5xx, throttling, bad or
missing credentials, a missing bucket): after boto3's bounded retries with jittered backoff
``fetch_posts`` raises it for the whole batch, and the worker must wait and retry rather than dead-letter
valid posts.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import structlog
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from schemas.errors import InfrastructureError, RecordError
from schemas.events import ErrorCode, ImageRef
from workers.secrets import mask_urls_in

log = structlog.get_logger(__name__)

MAX_SIDE = 2048  # longest side kept when no engine pixel bound is given (bounds worker memory)
DEFAULT_TARGET_PIXELS = MAX_SIDE * MAX_SIDE
DEFAULT_DECODE_BUDGET_BYTES = 512 * 1024 * 1024
# Formats a social platform receives as uploads, each a mature Pillow decoder (multi-picture JPEGs from
# phone cameras open through the JPEG plugin, as format "MPO"). Everything else is refused
# before a plugin sees the bytes: the 66k-input fuzz of issue 13 found crashes in AVIF, DDS, IM and GIF
# paths, and EPS would run Ghostscript on untrusted input.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF")
# Bytes per pixel of Pillow's *internal* storage (RGB and the 2-band modes are stored in 32 bits).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_HIGH_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Working memory of one decode relative to its decoded size: the decoded image plus the reduce/resize
# intermediates of ``thumbnail`` (at most ~1/4 of it with reducing_gap=2).
_WORKING_FACTOR = 1.5
Image.init()  # register every plugin once, so the allow-list below can name MPO/WEBP (open() is lazy)


class MediaError(RecordError):
    """A property of the post's image: the post is dead-lettered with ``code``."""


class MediaUnavailable(InfrastructureError):
    """S3 (or the credentials or bucket it needs) is unavailable: not the post's fault. Do not dead-letter,
    do not commit past the post; wait and retry the batch."""


@dataclass(frozen=True, slots=True)
class FetchedImage:
    ref: ImageRef
    sha256: str
    nbytes: int
    image: Image.Image


def bytes_per_pixel(mode: str) -> int:
    return _BYTES_PER_PIXEL.get(mode, 4)


class DecodeBudget:
    """A counting semaphore over decoded bytes: the decodes in flight together hold at most ``capacity``
    bytes of pixel memory. One decode larger than the whole budget is refused by the caller; a decode that
    fits waits until enough of the budget is free."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used = 0
        self._cv = threading.Condition()
        self.peak = 0

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        nbytes = min(nbytes, self.capacity)
        with self._cv:
            self._cv.wait_for(lambda: self._used + nbytes <= self.capacity)
            self._used += nbytes
            self.peak = max(self.peak, self._used)
        try:
            yield
        finally:
            with self._cv:
                self._used -= nbytes
                self._cv.notify_all()


_UNBOUNDED = DecodeBudget(1 << 62)


def image_nbytes(img: Image.Image) -> int:
    """Pixel memory Pillow holds for ``img`` (RGB is stored in 32 bits per pixel)."""
    return img.size[0] * img.size[1] * bytes_per_pixel(img.mode)


class _Charge:
    """One decoded image, shared by the posts of a fetch batch that reference it (identical refs are
    decoded once): its bytes go back to the budget when the last of those posts is released."""

    __slots__ = ("holders", "nbytes")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.holders = 0


class ImageLease:
    """A post's share of the ``ImageBudget``: held from the decode of its images until its outcome is
    produced (or it is dropped). ``release`` is idempotent: the bytes go back exactly once."""

    __slots__ = ("_budget", "_charges", "released")

    def __init__(self, budget: ImageBudget, charges: list[_Charge]) -> None:
        self._budget = budget
        self._charges = charges
        self.released = False

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._charges)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        freed = 0
        for c in self._charges:
            c.holders -= 1
            if c.holders == 0:
                freed += c.nbytes
        self._charges = []
        self._budget._give_back(freed)


class ImageBudget:
    """Bytes of normalised images held by posts from their decode until their outcome is produced
    (``GUARDSTREAM_INFLIGHT_IMAGE_BYTES``; issue 13 item 2).

    The worker reserves a post's worst case (``worst_case``: distinct refs × ``per_image_bytes``, the
    largest image ``decode_image`` can return) *before* fetching it, on the thread that admits records, and
    never blocks: a post that does not fit waits outside the window (backpressure) until releases make
    room. After the fetch, ``settle`` swaps the batch's reservation for the bytes of the images actually
    decoded (an image shared by several posts of the batch is counted once and freed with its last
    holder). A post larger than the whole budget is admitted when the budget is empty (alone), so it
    cannot deadlock. ``used`` never exceeds ``capacity`` except by such a lone post.

    (The transient working memory of decodes in progress is the ``DecodeBudget``'s, in the fetch threads;
    the two are separate because the fetch threads must never wait for a release only the admitting
    thread can make.)
    """

    def __init__(self, capacity: int, per_image_bytes: int) -> None:
        self.capacity = capacity
        self.per_image_bytes = per_image_bytes
        self._used = 0
        self._lock = threading.Lock()
        self.peak = 0

    @classmethod
    def for_target(cls, capacity: int, target_pixels: int) -> ImageBudget:
        """The budget for images normalised to at most ``target_pixels`` (and ``MAX_SIDE``), RGB."""
        return cls(capacity, min(target_pixels, MAX_SIDE * MAX_SIDE) * bytes_per_pixel("RGB"))

    @property
    def used(self) -> int:
        return self._used

    def worst_case(self, refs: Sequence[ImageRef]) -> int:
        return len(set(refs)) * self.per_image_bytes

    def fits(self, nbytes: int) -> bool:
        return self._used == 0 or self._used + nbytes <= self.capacity

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit (or the budget is empty: a lone oversized post); never waits."""
        with self._lock:
            if not (self._used == 0 or self._used + nbytes <= self.capacity):
                return False
            self._used += nbytes
            self.peak = max(self.peak, self._used)
            return True

    def settle(
        self, reserved: int, images_per_post: Sequence[Sequence[Image.Image]]
    ) -> list[ImageLease | None]:
        """Replace a batch's reservation by the bytes of its decoded images: one lease per post that holds
        images (None for one that holds none)."""
        charges: dict[int, _Charge] = {}
        leases: list[ImageLease | None] = []
        for images in images_per_post:
            if not images:
                leases.append(None)
                continue
            mine: dict[int, _Charge] = {}
            for img in images:
                c = charges.get(id(img))
                if c is None:
                    c = charges[id(img)] = _Charge(image_nbytes(img))
                if id(img) not in mine:
                    mine[id(img)] = c
                    c.holders += 1
            leases.append(ImageLease(self, list(mine.values())))
        actual = sum(c.nbytes for c in charges.values())
        with self._lock:
            self._used += actual - reserved
            self.peak = max(self.peak, self._used)
            assert self._used >= 0, "image budget: settled more than was reserved"
        return leases

    def _give_back(self, nbytes: int) -> None:
        if nbytes:
            with self._lock:
                self._used -= nbytes
                assert self._used >= 0, "image budget released below zero"


def decode_image(
    data: bytes,
    max_pixels: int,
    *,
    target_pixels: int = DEFAULT_TARGET_PIXELS,
    budget: DecodeBudget | None = None,
) -> Image.Image:
    """Decode untrusted bytes into an RGB image of at most ``target_pixels``, or raise ``MediaError``.

    Total: any exception from Pillow, numpy or a plugin becomes a ``MediaError`` (never anything else),
    because one hostile upload must cost one dead letter, not a worker crash on every restart."""
    if not data:
        raise MediaError(ErrorCode.IMAGE_EMPTY, "zero-byte object")
    budget = budget or _UNBOUNDED
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open(data, max_pixels, target_pixels)
            need = int(img.size[0] * img.size[1] * bytes_per_pixel(img.mode) * _WORKING_FACTOR)
            if need > budget.capacity:
                raise MediaError(
                    ErrorCode.IMAGE_DECOMPRESSION_BOMB,
                    f"{img.size[0]}x{img.size[1]} {img.mode} needs ~{need >> 20} MiB to decode, "
                    f"more than the decode budget ({budget.capacity >> 20} MiB)",
                )
            with budget.hold(need):
                img.load()
                return _normalise(img, target_pixels)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(ErrorCode.IMAGE_DECOMPRESSION_BOMB, str(exc)[:300]) from None
    except UnidentifiedImageError:
        raise MediaError(
            ErrorCode.IMAGE_NOT_AN_IMAGE,
            f"bytes are not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})",
        ) from None
    except MemoryError:
        raise MediaError(ErrorCode.IMAGE_DECOMPRESSION_BOMB, "decoding ran out of memory") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError(
            ErrorCode.IMAGE_TRUNCATED, f"image data is corrupt or truncated: {exc}"[:300]
        ) from None
    except Exception as exc:  # the one guard: plugins raise RuntimeError, IndexError, struct.error...
        raise MediaError(
            ErrorCode.IMAGE_TRUNCATED, f"image data is corrupt ({type(exc).__name__}: {exc})"[:300]
        ) from None


def _open(data: bytes, max_pixels: int, target_pixels: int) -> ImageFile.ImageFile:
    img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise MediaError(ErrorCode.IMAGE_NOT_AN_IMAGE, f"degenerate size {w}x{h}")
    if w * h > max_pixels:
        raise MediaError(
            ErrorCode.IMAGE_DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels exceeds cap {max_pixels}"
        )
    if getattr(img, "is_animated", False):
        img.seek(0)
    scale = _scale(w, h, target_pixels)
    if img.format in ("JPEG", "MPO") and scale < 1.0:
        # DCT-domain downscale by 1/2, 1/4 or 1/8 while decoding: a 40 MP JPEG never exists in memory.
        img.draft(img.mode, (max(1, int(w * scale)), max(1, int(h * scale))))
    return img


def _scale(w: int, h: int, target_pixels: int) -> float:
    """The downscale factor that fits ``target_pixels`` and ``MAX_SIDE`` (extreme aspect ratios)."""
    return min(1.0, math.sqrt(target_pixels / (w * h)), MAX_SIDE / max(w, h))


def _normalise(img: Image.Image, target_pixels: int) -> Image.Image:
    w, h = img.size
    scale = _scale(w, h, target_pixels)
    if scale < 1.0:
        # Downscale first, in the image's own mode: every later step (EXIF transpose, 16-bit scaling,
        # RGBA flattening, RGB conversion) copies the image, so it must already be small. reducing_gap:
        # a cheap box reduce, then bicubic (Pillow's reduce() has no 16-bit path; its resize does, at
        # ~0.2x the decoded size in extra memory, measured on a 39.7 MP 16-bit PNG).
        size = (max(1, int(w * scale)), max(1, int(h * scale)))
        gap = None if img.mode.startswith("I;16") else 2.0
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=gap)
    img = ImageOps.exif_transpose(img) or img
    if img.mode in _HIGH_DEPTH:
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise MediaError(ErrorCode.IMAGE_TRUNCATED, f"non-finite pixel values in a {img.mode} image")
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        img = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        img = background
    elif img.mode != "RGB":
        img = img.convert("RGB")
    return img


# S3 error codes that are the infrastructure's fault (credentials, permissions, a bucket that the
# configuration names but that does not exist, throttling). Any 5xx counts too.
_INFRA_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidToken",
        "AccountProblem",
        "NoSuchBucket",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "InternalError",
        "403",
        "503",
    }
)
_MISSING_OBJECT_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def classify_client_error(exc: ClientError, uri: str) -> MediaError | MediaUnavailable:
    """Map an S3 ``ClientError`` to the post's fault (``MediaError``) or the infrastructure's."""
    err = exc.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in _MISSING_OBJECT_CODES or (status == 404 and code != "NoSuchBucket"):
        return MediaError(ErrorCode.IMAGE_NOT_FOUND, f"{uri} does not exist")
    if code in _INFRA_CODES or (isinstance(status, int) and (status >= 500 or status in (401, 403, 429))):
        return MediaUnavailable(f"S3 refused {uri}: {code or status} (check credentials, bucket, S3 health)")
    # Any other 4xx is about this object (e.g. InvalidObjectState for an archived object): dead letter.
    return MediaError(ErrorCode.S3_UNAVAILABLE, f"S3 error for {uri}: {code or status}")


def release_large_allocations_to_os(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own mmap, returned to the
    OS on free.

    By default glibc raises its mmap threshold to the size of the largest block freed so far (up to
    32 MiB). Pillow stores decoded pixels in 16 MiB blocks, so after the first large image is freed every
    later one is carved from per-thread heaps that keep the pages: with 16 fetch threads, RSS grew to 2.6x
    the decode budget's accounting (595 MiB for 227 MiB of decodes in flight). A fixed threshold turns
    that off. Returns False where there is no glibc (musl, macOS), where the default behaviour stays."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_mmap_threshold = -3  # from malloc.h
        return bool(libc.mallopt(m_mmap_threshold, threshold))
    except (OSError, AttributeError):
        return False


class ImageFetcher(Protocol):
    """What the pipeline needs from a fetcher (``MediaFetcher``; ``workers.testing.FakeMediaFetcher``)."""

    def fetch_posts(
        self, refs_per_post: Sequence[Sequence[ImageRef]]
    ) -> list[list[FetchedImage] | MediaError]: ...

    def close(self) -> None: ...


class MediaFetcher:
    def __init__(
        self,
        s3: Any,
        allowed_buckets: Sequence[str],
        max_bytes: int,
        max_pixels: int,
        concurrency: int,
        *,
        target_pixels: int = DEFAULT_TARGET_PIXELS,
        decode_budget_bytes: int = DEFAULT_DECODE_BUDGET_BYTES,
    ) -> None:
        self._s3 = s3
        self._allowed = frozenset(allowed_buckets)
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._target_pixels = target_pixels
        self.budget = DecodeBudget(decode_budget_bytes)
        # Pillow's own bomb check (at open) uses this global; keep it consistent with our cap.
        Image.MAX_IMAGE_PIXELS = max_pixels
        release_large_allocations_to_os()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-fetch")

    def fetch_one(self, ref: ImageRef) -> FetchedImage:
        """Fetch and decode one image. Raises ``MediaError`` (the post's fault) or ``MediaUnavailable``."""
        if ref.bucket not in self._allowed:
            raise MediaError(
                ErrorCode.IMAGE_BUCKET_NOT_ALLOWED, f"bucket {ref.bucket!r} is not an allowed media bucket"
            )
        uri = ref.uri()
        try:
            # One request: the size cap is checked on the response's Content-Length before the body is
            # read (an oversized object is never downloaded), then enforced again while reading.
            # Transport errors, 5xx and throttling are retried inside boto3 (standard mode: bounded
            # attempts, jittered exponential backoff) before they reach us.
            obj = self._s3.get_object(Bucket=ref.bucket, Key=ref.key)
            size = int(obj.get("ContentLength", 0))
            body = obj["Body"]
            try:
                if size == 0:
                    raise MediaError(ErrorCode.IMAGE_EMPTY, f"{uri} is a zero-byte object")
                if size > self._max_bytes:
                    cap = self._max_bytes
                    raise MediaError(ErrorCode.IMAGE_TOO_LARGE, f"{uri} is {size} bytes, cap {cap}")
                data = body.read(self._max_bytes + 1)
            finally:
                body.close()
        except ClientError as exc:
            raise classify_client_error(exc, uri) from None
        except ParamValidationError as exc:
            raise MediaError(ErrorCode.IMAGE_REF_INVALID, f"{uri}: {exc}"[:300]) from None
        except (BotoCoreError, OSError) as exc:  # no credentials, connection refused/reset, timeouts
            detail = mask_urls_in(f"{type(exc).__name__}: {exc}")  # botocore names the endpoint URL
            raise MediaUnavailable(f"S3 unreachable for {uri}: {detail}"[:300]) from None
        if len(data) > self._max_bytes:
            raise MediaError(ErrorCode.IMAGE_TOO_LARGE, f"{uri} body exceeds cap {self._max_bytes}")
        image = decode_image(data, self._max_pixels, target_pixels=self._target_pixels, budget=self.budget)
        return FetchedImage(ref, hashlib.sha256(data).hexdigest(), len(data), image)

    def fetch_posts(
        self, refs_per_post: Sequence[Sequence[ImageRef]]
    ) -> list[list[FetchedImage] | MediaError]:
        """Fetch every image of every post concurrently; a post fails with its first image error.

        Identical refs in the batch are fetched and decoded once (64 posts × 4 refs to one image is one
        download and one decode). Raises ``MediaUnavailable`` if any fetch failed for an infrastructure
        reason: the whole batch must wait, no post of it is dead-lettered for that."""
        futures: dict[ImageRef, Future[FetchedImage]] = {}
        for refs in refs_per_post:
            for r in refs:
                if r not in futures:
                    futures[r] = self._pool.submit(self.fetch_one, r)
        unavailable: MediaUnavailable | None = None
        results: dict[ImageRef, FetchedImage | MediaError] = {}
        for r, f in futures.items():
            try:
                results[r] = f.result()
            except MediaError as exc:
                results[r] = exc
            except MediaUnavailable as exc:
                unavailable = unavailable or exc
            except Exception as exc:  # a bug: dead-letter this image's posts (redrivable once fixed)
                msg = f"fetch failed: {type(exc).__name__}: {exc}"[:300]
                results[r] = MediaError(ErrorCode.S3_UNAVAILABLE, msg)
        if unavailable is not None:
            log.warning("s3_unavailable", error=str(unavailable)[:300], refs=len(futures))
            raise unavailable
        out: list[list[FetchedImage] | MediaError] = []
        for refs in refs_per_post:
            images: list[FetchedImage] = []
            error: MediaError | None = None
            for r in refs:
                res = results[r]
                if isinstance(res, MediaError):
                    error = error or res
                else:
                    images.append(res)
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
