"""Post events by hand (``guardstream produce``): JSON lines or the sample feed into the posts topic.

Images a post references by a local path (``file:///abs/a.png`` or ``pics/a.png``, relative to the
input file) are uploaded to the media bucket under a content-addressed key and the reference is
rewritten to ``s3://bucket/key``, so the worker reads them exactly as it reads production uploads.
Re-running the same input uploads to the same keys (idempotent), and the Kafka key is the ``post_id``
(so one post's re-sends land on one partition, as the worker's ordering expects).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import ValidationError

from schemas.events import PostEvent

Upload = Callable[[str, str, bytes], None]  # (bucket, key, body)


class ProduceError(ValueError):
    """An input line that cannot become a post (names the line and the reason)."""


@dataclass
class Prepared:
    items: list[tuple[bytes | None, bytes]] = field(default_factory=list)  # (key, value) for the posts topic
    uploaded: dict[str, str] = field(default_factory=dict)  # local path -> s3:// ref


def _local_path(ref: str, base_dir: Path) -> Path | None:
    """The file a reference points at, or None for a reference that is not local (``s3://`` ...)."""
    parts = urlsplit(ref)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme:  # s3:// stays; anything else the event schema judges
        return None
    p = Path(ref).expanduser()
    return p if p.is_absolute() else base_dir / p


def image_key(data: bytes, name: str) -> str:
    return f"uploads/{hashlib.sha256(data).hexdigest()[:16]}/{Path(name).name}"


def prepare_posts(
    lines: Iterable[str],
    *,
    bucket: str,
    base_dir: Path,
    upload: Upload,
    validate: bool = True,
) -> Prepared:
    """Parse JSON lines into (key, value) records, uploading local images and rewriting their refs.

    ``validate`` checks each post against ``PostEvent`` before anything is produced (one bad line
    stops the whole input); without it, lines go out as they are, which is how to try the dead-letter
    paths by hand. Blank lines and ``#`` comments are skipped."""
    out = Prepared()
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            obj: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            if validate:
                raise ProduceError(f"line {n}: not JSON ({exc.msg} at column {exc.colno})") from None
            out.items.append((None, text.encode()))
            continue
        if isinstance(obj, dict) and isinstance(obj.get("images"), list):
            obj["images"] = [_upload_ref(r, n, bucket, base_dir, upload, out) for r in obj["images"]]
        value = json.dumps(obj).encode()
        if validate:
            try:
                PostEvent.model_validate_json(value)
            except ValidationError as exc:
                e = exc.errors()[0]
                where = ".".join(str(x) for x in e["loc"]) or "post"
                raise ProduceError(f"line {n}: {where}: {e['msg']}") from None
        key = obj.get("post_id") if isinstance(obj, dict) else None
        out.items.append((str(key).encode() if key else None, value))
    return out


def _upload_ref(ref: object, n: int, bucket: str, base_dir: Path, upload: Upload, out: Prepared) -> object:
    if not isinstance(ref, str):
        return ref
    path = _local_path(ref, base_dir)
    if path is None:
        return ref
    if str(path) in out.uploaded:
        return out.uploaded[str(path)]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProduceError(f"line {n}: image {ref!r}: {exc.strerror or exc}") from None
    key = image_key(data, path.name)
    upload(bucket, key, data)
    out.uploaded[str(path)] = f"s3://{bucket}/{key}"
    return out.uploaded[str(path)]


def sample_posts(n: int, bucket: str, upload: Upload) -> list[tuple[bytes | None, bytes]]:
    """The first ``n`` posts of the demo's sample feed (text, image, text+image and hostile events that
    must be dead-lettered), with its images uploaded to ``bucket``."""
    from workers.demo.sample_feed import build_feed

    feed, objects = build_feed(bucket)
    if n > len(feed):
        raise ProduceError(f"--sample {n}: the sample feed has {len(feed)} posts")
    for key, data in objects.items():
        upload(bucket, key, data)
    return [(p.key.encode(), p.value) for p in feed[:n]]
