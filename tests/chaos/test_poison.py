"""Poison pills on the real broker, S3 server and Redis (issue 13, item 1).

Each poison below crashed the previous worker on every restart (a lone surrogate in the content hasher,
Pillow's IndexError on a truncated GIF, TypeError on a TIFF, NotImplementedError paths of DDS...). A
mixed stream of them between valid posts must give exactly one verdict or dead letter per post, with a
stable error code, and the worker must drain the topic and exit 0: the real ``guardstream worker
--until-drained`` runs as a subprocess over the stream (its pre-flight checks, wiring and exit code
included).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections import Counter

import pytest

from guard.samples import drawn_image, png_bytes
from schemas.codec import DecodeError, decode_post
from schemas.events import ErrorCode
from tests.chaos.test_memory import png16_39mp
from tests.conftest import BUCKET, Services
from tests.support import subprocess_env
from tests.unit.test_fuzz_decoder import seeds
from workers.cache import ContentKeyer
from workers.demo.sample_feed import post
from workers.kafka.topics import produce_all, read_topic
from workers.settings import Settings


def test_lone_surrogate_is_refused_at_decode_with_a_stable_code() -> None:
    for field in ("text", "post_id", "author_id", "locale"):
        raw = post("p1", "a1", "hello").decode().replace('"hello"', '"x"')
        obj = json.loads(raw)
        obj[field] = "bad \ud800 text"
        with pytest.raises(DecodeError) as ei:
            decode_post(json.dumps(obj).encode())  # ensure_ascii: the surrogate travels as "\ud800"
        assert ei.value.code is ErrorCode.INVALID_JSON, field
        assert "surrogate" in ei.value.message
    obj = json.loads(post("p2", "a1", "hello"))
    obj["metadata"] = {"k\udfff": "v"}
    with pytest.raises(DecodeError):
        decode_post(json.dumps(obj).encode())
    # a surrogate *pair* is ordinary Unicode (an emoji) and still decodes
    assert decode_post(post("p3", "a1", "ok \U0001f600")).text == "ok \U0001f600"


def test_content_hasher_is_total_on_any_str() -> None:
    keyer = ContentKeyer(engine="e", model_version="m", policy="p")
    a, b = keyer("text", "x\ud800"), keyer("text", "x\udc00")
    assert len(a) == 64 and a != b
    # valid text hashes exactly as before (surrogatepass only acts on an error)
    assert keyer("text", "caf\u00e9") == keyer("text", "café")


@pytest.mark.integration
def test_mixed_poison_stream_never_stops_the_worker(kafka_settings: Settings, services: Services) -> None:
    s3 = services.s3_client()
    prefix = uuid.uuid4().hex
    gif = seeds()["gif_animated"]
    objects: dict[str, bytes] = {
        "ok.png": png_bytes(drawn_image(5)),
        "gif_cut.gif": gif[:1873],  # IndexError inside Pillow's GIF decoder before
        "dds.dds": seeds()["dds"],  # off the allow-list
        "tiff.tif": seeds()["tiff"],  # off the allow-list (TypeError on a flipped byte before)
        "eps.eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n",
        "avif_magic.png": b"\x00\x00\x00\x1cftypavif" + png_bytes(drawn_image(6))[12:],
        "png16_39mp.png": png16_39mp(),  # valid: a verdict, at bounded memory
        "cut.png": png_bytes(drawn_image(7))[:400],
    }
    for k, data in objects.items():
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{k}", Body=data)

    def img(k: str) -> list[str]:
        return [f"s3://{BUCKET}/{prefix}/{k}"]

    surrogate_text = json.dumps(
        {"post_id": "sur-text", "author_id": "a", "created_at": "2026-01-01T00:00:00Z", "text": "hi \ud800"}
    ).encode()
    surrogate_id = json.dumps(
        {"post_id": "sur-\ud800", "author_id": "a", "created_at": "2026-01-01T00:00:00Z", "text": "hi"}
    ).encode()
    surrogate_caption = json.dumps(
        {
            "post_id": "sur-caption",
            "author_id": "a",
            "created_at": "2026-01-01T00:00:00Z",
            "text": "caption \udc00",
            "images": img("ok.png"),
        }
    ).encode()
    feed: list[tuple[str, bytes, str]] = [  # key, value, expected outcome
        ("v1", post("v1", "a", "Anyone know a good pizza place downtown?"), "verdict"),
        ("sur-text", surrogate_text, ErrorCode.INVALID_JSON.value),
        ("v2", post("v2", "a", "nice picture", images=img("ok.png")), "verdict"),
        ("sur-id", surrogate_id, ErrorCode.INVALID_JSON.value),
        ("sur-caption", surrogate_caption, ErrorCode.INVALID_JSON.value),
        ("gif", post("gif", "a", images=img("gif_cut.gif")), ErrorCode.IMAGE_TRUNCATED.value),
        ("v3", post("v3", "a", "Had a great time at the beach"), "verdict"),
        ("dds", post("dds", "a", images=img("dds.dds")), ErrorCode.IMAGE_NOT_AN_IMAGE.value),
        ("tiff", post("tiff", "a", images=img("tiff.tif")), ErrorCode.IMAGE_NOT_AN_IMAGE.value),
        ("eps", post("eps", "a", images=img("eps.eps")), ErrorCode.IMAGE_NOT_AN_IMAGE.value),
        ("avif", post("avif", "a", images=img("avif_magic.png")), ErrorCode.IMAGE_NOT_AN_IMAGE.value),
        ("png16", post("png16", "a", "16-bit", images=img("png16_39mp.png")), "verdict"),
        ("cut", post("cut", "a", images=img("cut.png")), ErrorCode.IMAGE_TRUNCATED.value),
        ("junk", b"{not json", ErrorCode.INVALID_JSON.value),
        ("v4", post("v4", "a", "two images", images=img("ok.png") * 2), "verdict"),
    ]
    produce_all(
        kafka_settings.bootstrap_servers, kafka_settings.posts_topic, [(k.encode(), v) for k, v, _ in feed]
    )

    env = subprocess_env(
        kafka_settings,
        GUARDSTREAM_ENGINE="cpu",
        GUARDSTREAM_SESSION_TIMEOUT_MS="6000",
        GUARDSTREAM_MAX_BATCH_SIZE="8",
        GUARDSTREAM_LOG_FORMAT="json",
    )
    run = subprocess.run(
        [sys.executable, "-m", "workers.cli", "worker", "--until-drained"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    logs = run.stderr + run.stdout
    assert run.returncode == 0, logs[-3000:]
    (stopped,) = [json.loads(x) for x in logs.splitlines() if '"worker_stopped"' in x]
    assert stopped["consumed"] == len(feed)
    verdicts = [
        json.loads(x) for x in read_topic(kafka_settings.bootstrap_servers, kafka_settings.verdicts_topic)
    ]
    dlq = [json.loads(x) for x in read_topic(kafka_settings.bootstrap_servers, kafka_settings.dlq_topic)]
    got: dict[str, list[str]] = {}
    for v in verdicts:
        got.setdefault(v["post_id"], []).append("verdict")
    for d in dlq:  # the record key identifies the post even when its post_id could not be read
        got.setdefault(base64.b64decode(d["original_key_b64"]).decode(), []).append(d["error_code"])
    assert Counter(len(v) for v in got.values()) == Counter({1: len(feed)}), got
    assert {k: v[0] for k, v in got.items()} == {k: exp for k, _, exp in feed}
    print(
        f"\n{len(feed)} posts ({sum(e != 'verdict' for *_, e in feed)} poisons): "
        f"{len(verdicts)} verdicts, {len(dlq)} dead letters, `guardstream worker --until-drained` exit 0"
    )
