"""What an HTTP client costs the ``vllm-server`` path: CPU per request and rate against the sim server.

    python -m bench.http_clients [--n 800] [--in-flight 256]

The same chat-completion bodies (built as the server engine builds them, JSON-encoded before the clock)
sent with 2 × max_num_seqs outstanding through: one ``httpx.AsyncClient`` with a pool of that size
(what a single-client engine does), 16 ``httpx.AsyncClient``s of 1/16 the pool each, round-robin, and
one ``aiohttp.ClientSession``. The simulator runs 4× faster than in section 2 so that the client, not
the simulated GPU, is the limit. A single large httpcore pool scans its connections on every request
event (``httpcore/_async/connection_pool.py``, ``_assign_requests_to_connections`` / ``is_idle``), so
its CPU per request grows with the pool.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

import aiohttp
import httpx

from bench.clients import keep_in_flight
from bench.gpu_sim import SimConfig
from bench.sim_server import SimServerProcess
from guard.engines.server import ServerConfig, request_body
from guard.prompts import PromptSet
from guard.taxonomy import Taxonomy
from guard.types import ModerationItem
from infra.stack import free_port


async def _measure(call: Callable[[int], Awaitable[None]], n: int, in_flight: int) -> tuple[float, float]:
    c0 = time.process_time()
    run = await keep_in_flight(call, n, in_flight)
    return (time.process_time() - c0) / n * 1e3, run.rate(0)


async def httpx_pools(url: str, bodies: list[bytes], in_flight: int, shards: int) -> tuple[float, float]:
    per = max(1, in_flight // shards)
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
    clients = [httpx.AsyncClient(base_url=url, limits=limits, timeout=120) for _ in range(shards)]
    rr = itertools.cycle(clients)
    headers = {"Content-Type": "application/json"}

    async def call(i: int) -> None:
        r = await next(rr).post("/chat/completions", content=bodies[i], headers=headers)
        r.raise_for_status()
        r.json()

    try:
        return await _measure(call, len(bodies), in_flight)
    finally:
        for c in clients:
            await c.aclose()


async def aiohttp_session(url: str, bodies: list[bytes], in_flight: int) -> tuple[float, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as s:

        async def call(i: int) -> None:
            async with s.post(
                url + "/chat/completions", data=bodies[i], headers={"Content-Type": "application/json"}
            ) as r:
                r.raise_for_status()
                await r.json()

        return await _measure(call, len(bodies), in_flight)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--in-flight", type=int, default=256)
    a = ap.parse_args(argv)
    prompts = PromptSet(Taxonomy.load())
    cfg = ServerConfig()
    items = [ModerationItem(str(i), f"post {i} about plans for the weekend") for i in range(a.n)]
    bodies = [json.dumps(request_body(cfg, prompts, it)).encode() for it in items]
    with SimServerProcess(free_port(), replace(SimConfig(), time_scale=0.05)) as srv:
        runs: list[tuple[str, Callable[[], Coroutine[Any, Any, tuple[float, float]]]]] = [
            (
                f"httpx, one client, pool {a.in_flight}",
                lambda: httpx_pools(srv.url, bodies, a.in_flight, 1),
            ),
            (
                f"httpx, 16 clients, pool {a.in_flight // 16} each",
                lambda: httpx_pools(srv.url, bodies, a.in_flight, 16),
            ),
            (
                f"aiohttp, one session, limit {a.in_flight}",
                lambda: aiohttp_session(srv.url, bodies, a.in_flight),
            ),
        ]
        print(f"{'client':<40} {'CPU ms/request':>15} {'requests/s':>11}")
        for label, run in runs:
            cpu_ms, rate = asyncio.run(run())
            print(f"{label:<40} {cpu_ms:>15.2f} {rate:>11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
