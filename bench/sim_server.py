"""The GPU simulator behind an OpenAI-compatible chat-completions endpoint, like ``vllm serve``.

    python -m bench.sim_server --port 8003 [--time-scale 0.2] [--max-num-seqs 128]

Routes: ``POST /v1/chat/completions`` (the subset the ``vllm-server`` engine uses: system + user
messages, images as data URLs, ``max_tokens``, ``logprobs``/``top_logprobs``), ``GET /v1/models``,
``GET /health``, and for the benchmark ``GET /sim/stats`` and ``GET /sim/running?t0=&t1=`` (mean
running sequences per step over a wall-clock window). It runs in its own process (``SimServerProcess``)
as a real server would, so the worker under test does not share its interpreter with the "GPU".
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import IO, Any

import httpx
from aiohttp import web
from PIL import Image

from bench.gpu_sim import (
    GpuSim,
    SimConfig,
    SimEngineDeadError,
    SimRequest,
    content_digest,
    mean_running,
    text_tokens,
    visual_token_count,
)


def _image_size(url: str) -> tuple[bytes, tuple[int, int]]:
    """The image bytes of a data URL and its size from the header (no full decode)."""
    if not url.startswith("data:image/") or ";base64," not in url:
        raise ValueError("image_url must be a base64 data URL (this server does not fetch URLs)")
    raw = base64.b64decode(url.split(";base64,", 1)[1], validate=False)
    with Image.open(io.BytesIO(raw)) as img:
        return raw, img.size


def request_for(body: dict[str, Any], cfg: SimConfig) -> SimRequest:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("messages must be a non-empty list")
    parts: list[bytes | str] = []
    words = ""
    vis = n_img = 0
    for m in msgs:
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
            if m.get("role") == "user":
                words += content
            continue
        for part in content or []:
            if part.get("type") == "text":
                parts.append(part.get("text") or "")
                words += part.get("text") or ""
            elif part.get("type") == "image_url":
                raw, size = _image_size(part["image_url"]["url"])
                parts.append(raw)
                vis += visual_token_count(size, cfg)
                n_img += 1
    if n_img > 1:
        raise ValueError("At most 1 image(s) may be provided in one request.")  # limit_mm_per_prompt
    return SimRequest(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        digest=content_digest(*parts),
        prefill_tokens=cfg.template_tokens + text_tokens(words),
        visual_tokens=vis,
        max_tokens=int(body.get("max_tokens") or cfg.max_tokens),
        with_response=not (n_img and not words.strip()),
    )


def completion_body(body: dict[str, Any], req: SimRequest, sim: GpuSim) -> dict[str, Any]:
    out = sim.output_for(req)
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": out.text},
        "finish_reason": out.finish_reason,
    }
    if body.get("logprobs"):
        k = int(body.get("top_logprobs") or 0)
        content = []
        for i, tok in enumerate(out.tokens):
            top = sorted(out.top_logprobs(i).items(), key=lambda kv: -kv[1])
            content.append(
                {
                    "token": tok,
                    "logprob": out.top_logprobs(i)[tok],
                    "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top[:k]],
                }
            )
        choice["logprobs"] = {"content": content}
    return {
        "id": req.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "sim"),
        "choices": [choice],
        "usage": {
            "prompt_tokens": req.prefill_tokens + req.visual_tokens,
            "completion_tokens": len(out.tokens),
            "total_tokens": req.prefill_tokens + req.visual_tokens + len(out.tokens),
        },
    }


def make_app(sim: GpuSim) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            req = request_for(body, sim.config)
        except (ValueError, KeyError, TypeError, binascii.Error, OSError) as exc:
            return web.json_response({"error": {"message": str(exc), "type": "BadRequestError"}}, status=400)
        try:
            fut = sim.submit(req)
        except SimEngineDeadError as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=503)
        try:
            await fut
        except SimEngineDeadError as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=503)
        finally:
            if not fut.done():  # the client went away: abort, as vLLM does on disconnect
                sim.abort(req.request_id)
        return web.json_response(completion_body(body, req, sim))

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "ProGuard-7B", "object": "model"}]})

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({**sim.stats().as_dict(), "config": asdict(sim.config)})

    async def running(request: web.Request) -> web.Response:
        mean, steps = mean_running(sim.step_log, float(request.query["t0"]), float(request.query["t1"]))
        return web.json_response({"mean_running": mean, "steps": steps})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/sim/stats", stats)
    app.router.add_get("/sim/running", running)
    return app


class SimServerProcess:
    """Start ``python -m bench.sim_server`` on a free loopback port; stop it on exit."""

    def __init__(self, port: int, config: SimConfig | None = None) -> None:
        self.port = port
        self.config = config or SimConfig()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 30.0) -> SimServerProcess:
        # stderr to a file, not a pipe nobody reads while it runs (a full pipe would block the server)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process; closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.sim_server",
                "--port",
                str(self.port),
                "--config",
                json.dumps(asdict(self.config)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=os.environ.copy(),
            cwd=Path(__file__).resolve().parents[1],  # `-m bench.sim_server` resolves from the repo root
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                err = self.log.read().decode(errors="replace")
                raise RuntimeError(f"sim server exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)  # polling a port that is not open yet; no event to wait on
        self.stop()
        raise RuntimeError(f"sim server did not answer on port {self.port} within {timeout_s:.0f} s")

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"http://127.0.0.1:{self.port}/sim/stats", timeout=10).json()
        return data

    def mean_running(self, t0: float, t1: float) -> float:
        r = httpx.get(f"http://127.0.0.1:{self.port}/sim/running", params={"t0": t0, "t1": t1}, timeout=10)
        return float(r.json()["mean_running"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None

    def __enter__(self) -> SimServerProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8003)
    ap.add_argument("--config", help="SimConfig fields as JSON")
    ap.add_argument("--time-scale", type=float)
    ap.add_argument("--max-num-seqs", type=int)
    a = ap.parse_args(argv)
    cfg = SimConfig(**json.loads(a.config)) if a.config else SimConfig()
    if a.time_scale is not None:
        cfg = replace(cfg, time_scale=a.time_scale)
    if a.max_num_seqs is not None:
        cfg = replace(cfg, max_num_seqs=a.max_num_seqs)
    web.run_app(make_app(GpuSim(cfg)), host=a.host, port=a.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
