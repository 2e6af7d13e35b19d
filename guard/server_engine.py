"""ProGuard behind ``vllm serve`` (OpenAI-compatible chat completions), for GPU pools kept apart from
the workers. Same prompts and messages as ProGuard's deploy/inference.py; images go as data URLs.

A micro-batch is sent as concurrent requests (at most ``max_concurrency`` in flight); vLLM's continuous
batching on the server turns them into GPU batches. Transient failures (connection errors, 429, 5xx)
are retried with jittered exponential backoff; a request that still fails fails the batch with an
``EngineError`` and the worker retries/bisects it.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from guard.chat import combine, expand, openai_messages, p_unsafe_from_logprobs
from guard.parser import parse_output
from guard.prompts import PromptSet
from guard.types import EngineError, ModerationItem, Verdict
from schemas.events import Modality


@dataclass(frozen=True)
class ServerConfig:
    base_url: str = "http://127.0.0.1:8003/v1"
    model: str = "ProGuard-7B"
    api_key: str | None = None
    max_concurrency: int = 64
    timeout_s: float = 120.0
    max_attempts: int = 3
    backoff_base_s: float = 0.2
    temperature: float = 0.0
    max_tokens: int = 1024
    top_logprobs: int = 5


class ServerEngine:
    name = "proguard-vllm-server"

    def __init__(self, prompts: PromptSet, config: ServerConfig | None = None) -> None:
        self.config = c = config or ServerConfig()
        self.prompts = prompts
        self.taxonomy = prompts.taxonomy
        self.policy_version = prompts.policy_version
        self.model_version = f"{c.model}@{c.base_url}"
        headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key else {}
        self._http = httpx.Client(
            base_url=c.base_url.rstrip("/"),
            timeout=c.timeout_s,
            headers=headers,
            limits=httpx.Limits(
                max_connections=c.max_concurrency, max_keepalive_connections=c.max_concurrency
            ),
        )
        self._pool = ThreadPoolExecutor(max_workers=c.max_concurrency, thread_name_prefix="chat")

    def request_body(self, item: ModerationItem) -> dict[str, Any]:
        c = self.config
        return {
            "model": c.model,
            "messages": openai_messages(self.prompts, item),
            "max_tokens": c.max_tokens,
            "temperature": c.temperature,
            "logprobs": c.top_logprobs > 0,
            "top_logprobs": c.top_logprobs,
        }

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        last = ""
        for attempt in range(c.max_attempts):
            try:
                resp = self._http.post("/chat/completions", json=body)
                if resp.status_code == 200:
                    data: dict[str, Any] = resp.json()
                    return data
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if resp.status_code not in (408, 409, 429) and resp.status_code < 500:
                    break  # a 4xx will not improve with retries
            except (httpx.TransportError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < c.max_attempts:
                time.sleep(c.backoff_base_s * (2**attempt) * (0.5 + random.random()))
        raise EngineError(f"chat completion failed after {c.max_attempts} attempt(s): {last}")

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        expanded = expand(batch)
        futures = [self._pool.submit(self._post, self.request_body(it)) for _, it in expanded]
        parts: list[list[Verdict]] = [[] for _ in batch]
        for (i, it), fut in zip(expanded, futures, strict=True):
            parts[i].append(self._verdict(it, fut.result()))
        return [combine(p) for p in parts]

    def _verdict(self, item: ModerationItem, data: dict[str, Any]) -> Verdict:
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as exc:
            raise EngineError(f"malformed chat completion response: {exc!r}") from None
        v = parse_output(text, self.taxonomy, image_only=item.modality is Modality.IMAGE)
        content = (choice.get("logprobs") or {}).get("content") or []
        tokens = [str(t.get("token", "")) for t in content]
        tops = [
            {str(x.get("token", "")): float(x.get("logprob", -1e9)) for x in t.get("top_logprobs") or []}
            for t in content
        ]
        v.p_unsafe = p_unsafe_from_logprobs(tokens, tops)
        return v

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()
