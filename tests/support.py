"""Helpers the integration and chaos tests share: the environment of a ``guardstream`` subprocess, a worker
in a thread, and the revoke of a worker that has requests in flight."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from workers.kafka.worker import KafkaWorker
from workers.settings import ENV_PREFIX, Settings, child_environ
from workers.testing import FakeStreamingEngine
from workers.wiring import build_worker


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``GUARDSTREAM_*`` variable (the developer's shell's, a CI
    job's), plus ``extra`` (full variable names)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}, **extra}


def subprocess_env(s: Settings, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that is to run with ``s``: this process's without any
    ``GUARDSTREAM_*`` variable, each setting of ``s`` that is not its default (``child_environ``), then
    ``extra`` on top (full variable names: ``GUARDSTREAM_MAX_BATCH_SIZE="8"``)."""
    return {**child_environ(s), **extra}


def run_in_thread(w: KafkaWorker, errors: list[BaseException], **kw: Any) -> threading.Thread:
    def run() -> None:
        try:
            w.run(**kw)
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@dataclass
class Revoke:
    first: KafkaWorker
    second: KafkaWorker
    dropped: int  # requests the revoke cancelled in the first worker's engine
    images_held: int  # image bytes the first worker held when the second joined


def revoke_with_requests_in_flight(
    first: Settings, second: Settings, *, enter_at: int, what: str = "requests"
) -> Revoke:
    """Two workers in one group, each run until drained: the first's engine holds every request; once
    ``enter_at`` are in it the second joins, the first's partitions are revoked with ``what`` in flight,
    and once the revoke has cancelled them the engine lets the rest go. Returns when both have finished
    (and neither raised)."""
    stuck = FakeStreamingEngine(hold=lambda _pid: True, max_in_flight=128)
    stuck.enter_at = enter_at
    revoked = threading.Event()
    w1 = build_worker(first, stuck, on_event=lambda name, _d: revoked.set() if name == "revoked" else None)
    w2 = build_worker(second, FakeStreamingEngine())
    errors: list[BaseException] = []
    t1 = run_in_thread(w1, errors, until_drained=True)
    assert stuck.entered.wait(60), "requests never reached the engine"
    images_held = w1.images.used
    t2 = run_in_thread(w2, errors, until_drained=True)
    assert revoked.wait(60), f"no revoke while {what} were in flight"
    # the cancellations run on the engine's event loop, a moment after the revoke callback returns
    stuck.cancel_seen.wait(30)
    dropped = stuck.cancelled
    stuck.release.set()
    t1.join(120)
    t2.join(120)
    assert not t1.is_alive() and not t2.is_alive() and not errors, errors
    return Revoke(w1, w2, dropped, images_held)
