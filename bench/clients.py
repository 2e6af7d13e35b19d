"""Reference clients for the GPU simulator: what capacity is, and what a batch barrier costs.

- ``keep_in_flight``: the ideal client — always ``in_flight`` requests outstanding (≥ 2× max_num_seqs,
  so the scheduler's waiting queue is never empty), a new one submitted the moment one completes.
  Its steady-state rate is the simulator's capacity for that request mix.
- ``static_batches``: the old batch-synchronous pattern — submit a batch, wait for all of it, submit
  the next. Every batch runs at the speed of its longest generation.

Both take ``call(i) -> awaitable`` (request ``i`` of the feed) so the same clients drive the in-process
``SimAsyncLLM``, the HTTP server or a whole engine's ``judge``. Completion times are wall-clock
(``time.time()``), comparable with the simulator's step log and with a worker's publish times.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass


@dataclass
class ClientRun:
    done_at: list[float]  # wall-clock completion time of each request, in completion order
    latencies_s: list[float]  # submit → completion

    def steady_window(self, trim: int) -> tuple[float, float, int]:
        """(start, end, completions) between completion ``trim`` and completion ``n - trim``: the part of
        the run where the client had its full window outstanding (no ramp-up, no drain)."""
        return steady_window(self.done_at, trim)

    def rate(self, trim: int) -> float:
        t0, t1, k = self.steady_window(trim)
        return k / (t1 - t0) if t1 > t0 else 0.0


def steady_window(done_at: Sequence[float], trim: int) -> tuple[float, float, int]:
    ts = sorted(done_at)
    n = len(ts)
    trim = min(trim, max(0, (n - 2) // 4))  # short runs: keep at least half of the completions
    lo, hi = trim, n - 1 - trim
    if hi <= lo:
        return (ts[0], ts[-1], max(0, n - 1)) if n > 1 else (0.0, 0.0, 0)
    return ts[lo], ts[hi], hi - lo


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


async def keep_in_flight(call: Callable[[int], Awaitable[object]], n: int, in_flight: int) -> ClientRun:
    run = ClientRun([], [])
    next_i = 0
    sem = asyncio.Semaphore(in_flight)

    async def one(i: int) -> None:
        t = time.perf_counter()
        try:
            await call(i)
        finally:
            sem.release()
        run.latencies_s.append(time.perf_counter() - t)
        run.done_at.append(time.time())

    tasks: set[asyncio.Task[None]] = set()
    while next_i < n:
        await sem.acquire()
        task = asyncio.create_task(one(next_i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_i += 1
    if tasks:
        await asyncio.gather(*tasks)
    return run


async def static_batches(call: Callable[[int], Awaitable[object]], n: int, batch: int) -> ClientRun:
    run = ClientRun([], [])
    for start in range(0, n, batch):
        t = time.perf_counter()
        idx = range(start, min(n, start + batch))
        await asyncio.gather(*(call(i) for i in idx))
        now, wall = time.perf_counter(), time.time()
        # the batch is the unit: every post in it is published when the slowest is done
        run.latencies_s.extend(now - t for _ in idx)
        run.done_at.extend(wall for _ in idx)
    return run
