"""Outages are not the post's fault (issue 13, item 3): S3 down, 5xx/throttling, missing credentials and a
missing bucket raise ``MediaUnavailable`` (the worker waits, nothing is dead-lettered); only properties of
the post are ``MediaError``. A Redis that hangs (SIGSTOP of a redis-server this test started) trips the
cache's circuit breaker instead of costing every batch a socket timeout.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from botocore.exceptions import ClientError

from guard.samples import drawn_image, png_bytes
from infra.stack import RedisServer, S3Server, free_port
from schemas.events import ErrorCode, ImageRef
from schemas.wire import CachedVerdict
from tests.conftest import BUCKET, Services
from workers.cache import CircuitBreaker, VerdictCache
from workers.media import MediaError, MediaFetcher, MediaUnavailable, classify_client_error, make_s3_client
from workers.observability.sensors import RecordingSensor

CAP = 40_000_000


def _fetcher(endpoint: str, bucket: str = BUCKET, attempts: int = 2) -> MediaFetcher:
    return MediaFetcher(make_s3_client(endpoint, "us-east-1", attempts), [bucket], 1 << 20, CAP, 4)


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize(
    ("status", "code", "infra"),
    [
        (404, "NoSuchKey", False),
        (404, "404", False),
        (404, "NoSuchBucket", True),
        (403, "AccessDenied", True),
        (403, "InvalidAccessKeyId", True),
        (403, "SignatureDoesNotMatch", True),
        (400, "ExpiredToken", True),
        (503, "SlowDown", True),
        (500, "InternalError", True),
        (502, "", True),
        (429, "TooManyRequests", True),
        (403, "InvalidObjectState", True),  # a 403 is credentials/policy: the operator's to fix
        (400, "InvalidObjectState", False),  # an archived object: that post's, not the fleet's
    ],
)
def test_classification(status: int, code: str, infra: bool) -> None:
    res = classify_client_error(_client_error(status, code), "s3://b/k")
    assert isinstance(res, MediaUnavailable if infra else MediaError)


@pytest.mark.integration
def test_s3_down_then_back(tmp_path: object) -> None:
    port = free_port()
    server = S3Server(port=port, process=True).start()
    key = f"{uuid.uuid4().hex}.png"

    def seed() -> None:
        s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key=key, Body=png_bytes(drawn_image(1)))

    seed()
    f = _fetcher(server.endpoint)
    ref = [[ImageRef(bucket=BUCKET, key=key)]]
    try:
        assert isinstance(f.fetch_posts(ref)[0], list)
        server.stop()
        with pytest.raises(MediaUnavailable, match="S3 unreachable"):
            f.fetch_posts(ref)
        server = S3Server(port=port, process=True).start()  # back (moto is in-memory: seed it again)
        seed()
        assert isinstance(f.fetch_posts(ref)[0], list)
    finally:
        f.close()
        server.stop()


@pytest.mark.integration
def test_missing_bucket_is_an_outage_not_a_dead_letter(services: Services) -> None:
    f = _fetcher(services.s3.endpoint, bucket="bucket-nobody-created")
    try:
        with pytest.raises(MediaUnavailable, match="NoSuchBucket"):
            f.fetch_posts([[ImageRef(bucket="bucket-nobody-created", key="a.png")]])
        # while a missing *object* in an existing bucket is the post's fault
    finally:
        f.close()
    g = _fetcher(services.s3.endpoint)
    try:
        (res,) = g.fetch_posts([[ImageRef(bucket=BUCKET, key=f"{uuid.uuid4().hex}.png")]])
        assert isinstance(res, MediaError) and res.code is ErrorCode.IMAGE_NOT_FOUND
    finally:
        g.close()


@pytest.mark.integration
def test_missing_credentials_are_an_outage(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the credentials it found earlier
    f = _fetcher(services.s3.endpoint)
    try:
        with pytest.raises(MediaUnavailable, match="NoCredentialsError"):
            f.fetch_posts([[ImageRef(bucket=BUCKET, key="a.png")]])
    finally:
        f.close()


class _Failing(BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request with 503 SlowDown (counted)."""

    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        return


@pytest.fixture
def slow_down_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    _Failing.hits = 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_throttling_is_retried_with_backoff_then_an_outage(slow_down_endpoint: str) -> None:
    f = _fetcher(slow_down_endpoint, attempts=3)
    try:
        with pytest.raises(MediaUnavailable, match="SlowDown"):
            f.fetch_posts([[ImageRef(bucket=BUCKET, key="a.png")], [ImageRef(bucket=BUCKET, key="a.png")]])
    finally:
        f.close()
    # retried (boto3's 3 attempts, jittered backoff), and the ref shared by both posts fetched once (botocore
    # may add one bucket-region probe after a failed request)
    assert 3 <= _Failing.hits < 6, _Failing.hits


# ---------------------------------------------------------------- Redis circuit breaker


def test_breaker_unit() -> None:
    now = [0.0]
    sensor = RecordingSensor()
    b = CircuitBreaker(1.0, 4.0, clock=lambda: now[0], sensor=sensor)
    assert b.allow()
    b.failure()
    assert b.is_open and not b.allow()
    now[0] = 1.0
    assert b.allow()  # the trial
    b.failure()  # failed trial: 2 s now
    now[0] = 2.5
    assert not b.allow()
    now[0] = 3.0
    assert b.allow()
    b.success()
    assert not b.is_open and b.allow()
    assert sensor.cache_breaker == [True, True, False] and sensor.cache_skipped == 2


@pytest.mark.integration
def test_hung_redis_trips_the_breaker() -> None:
    server = RedisServer().start()
    assert server.proc is not None
    now = [0.0]
    sensor = RecordingSensor()
    cache = VerdictCache(
        server.url, 60, socket_timeout_s=0.2, cooldown_s=5.0, clock=lambda: now[0], sensor=sensor
    )
    verdict = CachedVerdict(safe=True)
    keys = [f"k{i}" for i in range(8)]
    try:
        cache.put_many([(k, verdict) for k in keys])
        assert all(v is not None for v in cache.get_many(keys))
        os.kill(server.proc.pid, signal.SIGSTOP)  # our own redis-server: hung, connections stay open
        t0 = time.monotonic()
        for _ in range(50):  # 50 batches: lookup + write each
            assert cache.get_many(keys) == [None] * len(keys)
            cache.put_many([(k, verdict) for k in keys])
        elapsed = time.monotonic() - t0
        # one socket timeout, then the breaker skips Redis: not 100 × 0.2 s
        assert elapsed < 1.5, elapsed
        assert cache.breaker.is_open and sensor.cache_skipped == 99
        assert sensor.cache_errors == 1 and sensor.cache_breaker == [True]
        os.kill(server.proc.pid, signal.SIGCONT)
        now[0] += 5.0  # the cool-down is over: the next call is the trial
        hits = cache.get_many(keys)
        if any(h is None for h in hits):  # the trial may have raced the reconnect; once more
            now[0] += 60.0
            hits = cache.get_many(keys)
        assert all(h is not None for h in hits) and not cache.breaker.is_open
        assert sensor.cache_breaker[-1] is False
        print(f"\n100 cache calls against a SIGSTOPped Redis took {elapsed:.2f} s (breaker open)")
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        cache.close()
        server.stop()
