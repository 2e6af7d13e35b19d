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


async def paced_streaming(call: Callable[[int], Awaitable[object]], n: int, rate: float) -> list[float]:
    """Arrivals every ``1/rate`` s, each submitted the moment it arrives (the streaming design).
    Returns arrival → completion latencies (s)."""
    lat: list[float] = []
    t0 = time.perf_counter()

    async def one(i: int, arrived: float) -> None:
        await call(i)
        lat.append(time.perf_counter() - arrived)

    tasks = []
    for i in range(n):
        arrive = t0 + i / rate
        delay = arrive - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # the arrival process itself, not synchronization
        tasks.append(asyncio.create_task(one(i, arrive)))
    await asyncio.gather(*tasks)
    return lat


async def paced_batches(
    call: Callable[[int], Awaitable[object]], n: int, rate: float, batch: int, max_wait_s: float
) -> list[float]:
    """The same arrivals into the batch-synchronous design: a batch closes at ``batch`` posts or
    ``max_wait_s`` after its first, one batch in the engine at a time, the next gathering meanwhile.
    Returns arrival → completion latencies (s)."""
    lat: list[float] = []
    t0 = time.perf_counter()
    arrivals = [t0 + i / rate for i in range(n)]
    i = 0
    while i < n:
        close_at = arrivals[i] + max_wait_s  # gathering began when its first post arrived
        if arrivals[i] > time.perf_counter():
            await asyncio.sleep(arrivals[i] - time.perf_counter())  # waiting for the next arrival
        j = i
        while j < n and j - i < batch and arrivals[j] <= max(close_at, time.perf_counter()):
            if arrivals[j] > time.perf_counter():
                await asyncio.sleep(arrivals[j] - time.perf_counter())
            j += 1
        await asyncio.gather(*(call(k) for k in range(i, j)))
        done = time.perf_counter()
        lat.extend(done - arrivals[k] for k in range(i, j))
        i = j
    return lat
