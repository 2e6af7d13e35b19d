"""A small local HTTP server implementing the subset of the OpenAI chat-completions API that
``vllm serve`` exposes and the server engine uses. It validates each request like vLLM would for a
single-image model, decodes the data-URL images, and answers with canned ProGuard-format text chosen
by the test (``respond``), with per-token logprobs. ``GET /v1/models`` lists ``served_models`` (the
worker's start-up probe). Failures can be planted by count (``fail_first``), for a span of time
(``fail_until``, or ``outage_s`` from the first request on: a server that is down, then recovers) or
per request (``fail_if``: a status for one post while the server answers the others)."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

TOKEN_RE = re.compile(r"<[a-z/]+>|[A-Za-z]+|\d+|\s+|.", re.DOTALL)


def tokenize(text: str) -> list[str]:
    """Split like a BPE would at this granularity, with "unsafe" as "uns" + "afe" (as Qwen's BPE does)."""
    out: list[str] = []
    for t in TOKEN_RE.findall(text):
        out.extend(["uns", "afe"] if t == "unsafe" else [t])
    return out


@dataclass
class ChatServer:
    respond: Callable[[dict[str, Any]], str]
    label_confidence: float = -0.05  # logprob of the chosen safe/unsafe label
    fail_first: int = 0  # answer 503 to this many requests first
    fail_status: int = 503  # the status of those failures
    fail_until: float = 0.0  # time.monotonic() before which every request gets fail_status
    outage_s: float = 0.0  # from the first chat request on, every request gets fail_status this long
    fail_if: Callable[[dict[str, Any]], int | None] | None = None  # a status to fail this request with
    served_models: list[str] = field(default_factory=lambda: ["ProGuard-7B"])  # GET /v1/models
    delay: Callable[[dict[str, Any]], float] | None = None  # seconds to "generate" a request's answer
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # of each POST
    get_headers: list[dict[str, str]] = field(default_factory=list)  # of each GET /v1/models
    completed: list[str] = field(default_factory=list)  # user texts, in the order their answers were sent
    received: threading.Event = field(default_factory=threading.Event)  # set at the first request
    images: list[Image.Image] = field(default_factory=list)
    max_in_flight: int = 0
    _in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> ChatServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, obj: dict[str, Any]) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": "not found"}})
                with server._lock:
                    server.get_headers.append(dict(self.headers.items()))
                data = [{"id": m, "object": "model", "owned_by": "vllm"} for m in server.served_models]
                return self._send(200, {"object": "list", "data": data})

            def do_POST(self) -> None:
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.headers.append(dict(self.headers.items()))
                    server.received.set()
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                    status: int | None = None
                    if server.outage_s and not server.fail_until:  # the outage starts now
                        server.fail_until = time.monotonic() + server.outage_s
                    if server.fail_first > 0:
                        server.fail_first -= 1
                        status = server.fail_status
                    elif time.monotonic() < server.fail_until:
                        status = server.fail_status
                    elif server.fail_if is not None:
                        status = server.fail_if(body)
                counted = [True]

                def reply(code: int, payload: dict[str, Any]) -> None:
                    # no longer in flight *before* the answer leaves: the client may send its next request
                    # the moment it reads this one, before this thread would reach a ``finally``
                    with server._lock:
                        server._in_flight -= 1
                        counted[0] = False
                    self._send(code, payload)

                try:
                    if status is not None:
                        return reply(status, {"error": {"message": "engine overloaded"}})
                    err = server.validate(body)
                    if err:
                        return reply(400, {"error": {"message": err}})
                    with server._lock:
                        server.requests.append(body)
                    text = server.respond(body)
                    if server.delay is not None:
                        time.sleep(server.delay(body))  # the model generating; holds this connection
                    with server._lock:
                        server.completed.append(body["messages"][1]["content"][-1].get("text", ""))
                    return reply(200, server.completion(body, text))
                finally:
                    if counted[0]:  # an exception before the reply
                        with server._lock:
                            server._in_flight -= 1

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024  # the default backlog (5) refuses bursts of concurrent clients

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def validate(self, body: dict[str, Any]) -> str | None:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or len(msgs) != 2:
            return "expected [system, user] messages"
        if msgs[0].get("role") != "system" or not isinstance(msgs[0].get("content"), str):
            return "first message must be the system prompt"
        user = msgs[1]
        if user.get("role") != "user" or not isinstance(user.get("content"), list):
            return "second message must be a user message with a content list"
        n_img = 0
        for part in user["content"]:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                m = re.match(r"data:image/(png|jpeg);base64,(.*)$", url, re.DOTALL)
                if not m:
                    return "image must be a data URL"
                img = Image.open(io.BytesIO(base64.b64decode(m.group(2))))
                img.load()
                with self._lock:
                    self.images.append(img)
                n_img += 1
            elif part.get("type") != "text":
                return f"unknown content part {part.get('type')}"
        if n_img > 1:
            return "At most 1 image(s) may be provided in one request."  # vLLM's limit_mm_per_prompt error
        if user["content"][-1].get("type") != "text":
            return "text part must come last"
        return None

    def completion(self, body: dict[str, Any], text: str) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        if body.get("logprobs"):
            content = []
            k = int(body.get("top_logprobs") or 0)
            for tok in tokenize(text):
                top = [{"token": tok, "logprob": self.label_confidence if tok in ("uns", "safe") else -0.01}]
                if tok == "uns":
                    top.append({"token": "safe", "logprob": -3.0})
                elif tok == "safe":
                    top.append({"token": "uns", "logprob": -3.0})
                content.append({"token": tok, "logprob": top[0]["logprob"], "top_logprobs": top[:k]})
            choice["logprobs"] = {"content": content}
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
