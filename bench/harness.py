"""What every benchmark section shares: the local stack, the run sizes, timing, tables, the child
process runner and the section registry.

- ``local_stack()`` starts the real broker (Tansu), S3 server (moto, in its own process, with the media
  bucket) and a throwaway Redis, and yields an ``Env``; ``Env.settings()`` gives a worker its own topics
  and consumer group, so sections never see each other's posts.
- ``QUICK`` / ``FULL``: the sizes of ``python -m bench --quick`` and of the full run, side by side.
- ``run_worker`` times the real worker draining a backlog; ``Run.rate`` is posts/s from the first
  published post to the last, so group joins and model loads are excluded.
- ``child()`` runs a measurement in a fresh interpreter (``python -m bench --child NAME ARGS…``, answered
  by the section's registered ``child``), so the peak RSS it reports is its own.
- ``@section(name, order=…, summary=…)`` registers a section's ``run(ctx) -> dict``; ``registry()`` lists
  them in order. ``python -m bench --only`` takes their names; ``--json`` writes each one's dict under its
  ``key``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from guard.types import GuardEngine
from infra.stack import Broker, RedisServer, S3Server, create_topics, ensure_bucket, free_port
from workers.demo.sample_feed import post
from workers.kafka.topics import produce_all
from workers.pipeline.records import Outcome
from workers.settings import Settings
from workers.testing import OutcomeRecorder
from workers.wiring import build_worker

console = Console(width=max(Console().width, 150))  # the tables are wide; a pipe is not a terminal
BUCKET = "guardstream-media"


# --- the local stack ---------------------------------------------------------------------------------


@dataclass
class Env:
    bootstrap: str
    s3: str
    redis_url: str

    def settings(self, **kw: Any) -> Settings:
        """Worker settings on this stack with fresh topics (created here) and a fresh group; ``kw``
        overrides any field."""
        sfx = uuid.uuid4().hex[:8]
        base: dict[str, Any] = dict(
            bootstrap_servers=self.bootstrap,
            group_id=f"bench-{sfx}",
            posts_topic=f"posts-{sfx}",
            verdicts_topic=f"verdicts-{sfx}",
            novel_risk_topic=f"novel-{sfx}",
            dlq_topic=f"dlq-{sfx}",
            s3_endpoint_url=self.s3,
            allowed_buckets=[BUCKET],
            redis_url=self.redis_url,
            session_timeout_ms=6000,
            max_batch_size=256,
            max_wait_ms=50,
            log_format="json",
            log_level="WARNING",
            lag_interval_s=3600,
        )
        base.update(kw)
        s = Settings(**base)
        create_topics(
            s.kafka.bootstrap_servers,
            {
                s.kafka.posts_topic: 3,
                s.kafka.verdicts_topic: 3,
                s.kafka.novel_risk_topic: 1,
                s.kafka.dlq_topic: 1,
            },
        )
        return s

    def s3_client(self) -> Any:
        """A boto3 S3 client on this stack's S3 server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.s3, region_name="us-east-1")


@contextmanager
def local_stack() -> Iterator[Env]:
    """Redis (our own, so no one else's data is touched), the broker and S3 with the media bucket; all
    stopped on exit."""
    redis_server = RedisServer().start()
    try:
        broker = Broker(port=free_port()).start()
        try:
            s3 = S3Server(port=free_port(), process=True).start()
            try:
                env = Env(broker.bootstrap, s3.endpoint, redis_server.url)
                ensure_bucket(env.s3_client(), BUCKET)
                yield env
            finally:
                s3.stop()
        finally:
            broker.stop()
    finally:
        redis_server.stop()


# --- sizes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    overhead: int  # text posts through the raw loop, the minimal loop and the worker
    gpu: int  # posts per GPU-simulator feed
    gpu_static: int  # posts through the static-batch client
    gpu_paced_s: int  # seconds of the paced (latency) run
    cache: int  # posts per cache stream
    cpu: int  # short posts through the CPU engine
    memory: int  # the backlog the worker drains
    image_memory: int  # posts in the worst image feed


QUICK = Sizes(
    overhead=2_000, gpu=500, gpu_static=96, gpu_paced_s=6, cache=1_000, cpu=256, memory=5_000, image_memory=32
)
FULL = Sizes(
    overhead=20_000,
    gpu=2_400,
    gpu_static=480,
    gpu_paced_s=20,
    cache=10_000,
    cpu=2_048,
    memory=100_000,
    image_memory=128,
)


@dataclass(frozen=True)
class Ctx:
    """What a section's ``run`` gets."""

    env: Env
    sizes: Sizes


# --- feeds, timing, output -----------------------------------------------------------------------------


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def seed(s: Settings, values: list[bytes]) -> None:
    produce_all(s.kafka.bootstrap_servers, s.kafka.posts_topic, [(None, v) for v in values])


def text_posts(n: int, tag: str, distinct: int | None = None) -> list[bytes]:
    d = distinct or n
    return [
        post(f"{tag}-{i}", f"a{i % 97}", f"post {i % d} from the benchmark feed about weekend plans {tag}")
        for i in range(n)
    ]


@dataclass
class Run:
    posts: int
    seconds: float
    outcomes: list[Outcome]

    @property
    def rate(self) -> float:
        return self.posts / self.seconds if self.seconds > 0 else 0.0


def run_worker(s: Settings, engine: GuardEngine, n: int, label: str, keep: bool = False) -> Run:
    """The worker draining ``n`` posts. The streaming worker reports outcomes per commit interval (too
    coarse to time a run of a second or two), so the clock is the verdicts' own ``decided_at`` (one per
    group of posts finished together): posts decided after the first group ÷ (last − first decided)."""
    decided = array("d")  # 8 bytes a post: the memory benchmark's peak RSS is not disturbed
    with progress() as prog:
        task = prog.add_task(label, total=n)

        def on_batch(outs: list[Outcome]) -> None:
            decided.extend(o.verdict.decided_at.timestamp() for o in outs if o.verdict is not None)
            prog.advance(task, len(outs))

        recorder = OutcomeRecorder(on_batch, keep=keep)
        build_worker(s, engine, observers=[recorder]).run(until_drained=True)
    if len(decided) < 2:
        return Run(0, 0.0, recorder.outcomes)
    first, last = min(decided), max(decided)
    return Run(sum(1 for t in decided if t > first), last - first, recorder.outcomes)


def table(title: str, cols: list[str], rows: list[list[str]]) -> None:
    t = Table(title=title)
    for col in cols:
        t.add_column(col)
    for r in rows:
        t.add_row(*r)
    console.print(t)


# --- child processes -----------------------------------------------------------------------------------


def child(name: str, *args: str) -> dict[str, Any]:
    """Run section ``name``'s ``child(args)`` in a fresh interpreter, so its peak RSS is its own."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--child", name, *args], capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {(name, *args)} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run_child(name: str, args: list[str]) -> int:
    """The ``--child`` side: progress goes to stderr, the result is stdout's last line (JSON)."""
    sec = by_name().get(name)
    if sec is None or sec.child is None:
        raise SystemExit(f"bench --child: no section {name!r} runs a child")
    console.file = sys.stderr
    print(json.dumps(sec.child(args)))
    return 0


# --- the section registry ------------------------------------------------------------------------------

SectionRun = Callable[[Ctx], dict[str, Any]]
ChildRun = Callable[[list[str]], dict[str, Any]]


@dataclass(frozen=True)
class Section:
    name: str  # what --only takes
    order: int  # the sections run (and are numbered in --help) in this order
    summary: str  # one paragraph for --help
    key: str  # the --json key of its results
    run: SectionRun
    child: ChildRun | None = None  # what `python -m bench --child NAME ARGS…` runs, if the section forks


SECTIONS: dict[str, Section] = {}


def section(
    name: str, *, order: int, summary: str, key: str | None = None, child: ChildRun | None = None
) -> Callable[[SectionRun], SectionRun]:
    """Register the decorated ``run(ctx) -> dict`` as section ``name`` (``key`` defaults to ``name``)."""

    def register(run: SectionRun) -> SectionRun:
        for other in SECTIONS.values():
            if (other.name == name or other.order == order) and other.run.__module__ != run.__module__:
                raise ValueError(f"bench section {name!r} (order {order}) clashes with {other.name!r}")
        SECTIONS[name] = Section(name, order, summary, key or name, run, child)
        return run

    return register


def registry() -> list[Section]:
    """Every section, in order (importing ``bench.sections`` registers them)."""
    import bench.sections  # noqa: F401

    return sorted(SECTIONS.values(), key=lambda s: s.order)


def by_name() -> dict[str, Section]:
    return {s.name: s for s in registry()}
