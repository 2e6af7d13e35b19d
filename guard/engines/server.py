"""ProGuard behind ``vllm serve`` (OpenAI-compatible chat completions), for GPU pools kept apart from
the workers. Same prompts and messages as ProGuard's deploy/inference.py; images go as data URLs.

``AsyncServerEngine`` (the worker's streaming engine) sends one request per prompt, at most
``max_concurrency`` at once (default 256 = 2 × the server's default ``max_num_seqs`` 128, so the
server's waiting queue refills its running batch the step a sequence finishes), over a sharded pool:
ceil(max_concurrency / 16) ``httpx.AsyncClient``s of at most 16 connections each, each request on the
least-loaded one (why: see ``CONNECTIONS_PER_CLIENT``). ``ServerEngine`` is the batch ``GuardEngine``
kept for replay and the bench's batch baseline.

Failures, per request. What is the post's own is an ``EngineRequestError`` (that post fails): a
4xx other than the ones below (400 "prompt too long", 413, 422...), or a 200 whose body is not a chat
completion. What is the server's is infrastructure, never the post's: 5xx, 408/409/429, timeouts and
transport errors (connection refused or reset, connect timeout) are retried with jittered exponential
backoff (capped at ``backoff_max_s``) for as long as the server has been failing for less than
``dead_after_s`` (no success on any request since the first failure), then ``EngineDeadError``: the
worker holds the posts uncommitted, retries them with backoff and exits (code 3) past
``ENGINE_DEADLINE_S``. A 5xx burst shorter than ``dead_after_s`` costs latency, not dead letters. Only when
the server keeps failing one request for ``dead_after_s`` while answering other requests in between
(the server is up, this request is what fails) is that request an ``EngineRequestError``. 401/403/404/407
say the configuration is wrong (API key, URL, model name): ``EngineDeadError`` at once, naming the
setting, since no post could succeed.

Credentials: ``api_key`` goes as ``Authorization: Bearer``; userinfo in ``base_url``
(``https://user:pass@host/v1``) is stripped from the URL and sent as HTTP basic auth. Neither ever
appears in ``model_version``, logs or error messages (they name ``display_url``: no userinfo, no query).

Sampling: only temperature, max_tokens, logprobs/top_logprobs and seed are sent, so the server's own
defaults from the checkpoint's generation_config (``vllm serve`` applies them to every request that does
not override them; ``vllm/entrypoints/openai/serving_chat.py``) stay in force.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import structlog

from guard.chat import combine, expand, openai_messages, p_unsafe_from_logprobs
from guard.config import ServerConfig as ServerConfig
from guard.errors import EngineDeadError, EngineError, EngineRequestError
from guard.parser import parse_output
from guard.prompts import PromptSet
from guard.types import ModerationItem, Verdict
from schemas.events import Modality

log = structlog.get_logger(__name__)

# Connections per httpx.AsyncClient. httpcore's pool scans all of its connections and queued requests on
# every request event (httpcore/_async/connection_pool.py: _assign_requests_to_connections, is_idle), so
# one client's CPU per request grows with its pool: `python -m bench.http_clients` (256 outstanding
# against the sim server, 2-core dev VM) measured one client with a 256-connection pool at ~13 ms CPU per
# request and 72 req/s (the engine then kept ~30 of 128 sequences running, 0.4-0.5x of capacity), and 16
# clients of 16 connections at 1.2 ms and 404 req/s. Small pools keep that scan short; more, smaller
# clients would only add per-client overhead.
CONNECTIONS_PER_CLIENT = 16


def split_credentials(base_url: str) -> tuple[str, str, httpx.BasicAuth | None]:
    """``base_url`` → (URL without userinfo, the same without query for display, basic auth or None)."""
    url = httpx.URL(base_url)
    auth = httpx.BasicAuth(url.username, url.password) if url.userinfo else None
    clean = url.copy_with(userinfo=b"")
    return str(clean), str(clean.copy_with(query=None)), auth


def request_body(config: ServerConfig, prompts: PromptSet, item: ModerationItem) -> dict[str, Any]:
    c = config
    return {
        "model": c.model,
        "messages": openai_messages(prompts, item),
        "max_tokens": c.max_tokens,
        "temperature": c.temperature,
        "logprobs": c.top_logprobs > 0,
        "top_logprobs": c.top_logprobs,
        "seed": c.seed,
    }


def verdict_from_response(prompts: PromptSet, item: ModerationItem, data: dict[str, Any]) -> Verdict:
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] or ""
    except (KeyError, IndexError, TypeError) as exc:
        raise EngineRequestError(f"malformed chat completion response: {exc!r}") from None
    v = parse_output(text, prompts.taxonomy, image_only=item.modality is Modality.IMAGE)
    content = (choice.get("logprobs") or {}).get("content") or []
    tokens = [str(t.get("token", "")) for t in content]
    tops = [
        {str(x.get("token", "")): float(x.get("logprob", -1e9)) for x in t.get("top_logprobs") or []}
        for t in content
    ]
    v.p_unsafe = p_unsafe_from_logprobs(tokens, tops)
    return v


def _retryable_status(code: int) -> bool:
    return code in (408, 409, 429) or code >= 500


# Statuses no post could get past: the engine's configuration is wrong (the fix, by setting).
_CONFIG_STATUS = {
    401: "set GUARDSTREAM_VLLM_SERVER_API_KEY (or the credentials in GUARDSTREAM_VLLM_SERVER_URL)",
    403: "set GUARDSTREAM_VLLM_SERVER_API_KEY (or the credentials in GUARDSTREAM_VLLM_SERVER_URL)",
    404: "check GUARDSTREAM_VLLM_SERVER_URL (the API root, ending in /v1) and GUARDSTREAM_VLLM_SERVER_MODEL "
    "(the --served-model-name)",
    407: "the proxy between the worker and GUARDSTREAM_VLLM_SERVER_URL wants credentials",
}


class AsyncServerEngine:
    """``StreamingEngine`` on a vLLM OpenAI-compatible server: one chat completion per prompt."""

    name = "proguard-vllm-server"

    def __init__(self, prompts: PromptSet, config: ServerConfig | None = None) -> None:
        self.config = c = config or ServerConfig()
        if c.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1 (VLLM_SERVER_CONCURRENCY)")
        self.prompts = prompts
        self.taxonomy = prompts.taxonomy
        self.policy_version = prompts.policy_version
        self._url, self.display_url, basic = split_credentials(c.base_url)
        self.model_version = f"{c.model}@{self.display_url}"
        self.max_in_flight = c.max_in_flight or c.max_concurrency
        self._headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key else {}
        self._auth = None if c.api_key else basic
        # Shards: n clients of per_client connections, n * per_client >= max_concurrency. A request goes to
        # the client with the fewest requests in flight; since at most max_concurrency - 1 others are in
        # flight when one picks, that client has fewer than per_client, so no request ever queues inside
        # an httpcore pool while another shard has a free connection (round-robin could pile up on one
        # shard: completions come back in any order).
        self.http_clients = math.ceil(c.max_concurrency / CONNECTIONS_PER_CLIENT)
        self.connections_per_client = math.ceil(c.max_concurrency / self.http_clients)
        # made on first use, inside the event loop that awaits judge (httpx's pool is loop-bound)
        self._clients: list[httpx.AsyncClient] = []
        self._load: list[int] = []  # requests in flight per client
        self._slots = asyncio.Semaphore(c.max_concurrency)
        self._failing_since: float | None = None  # first failure since the last success
        self._last_success = float("-inf")  # when the server last answered any request
        self._closed = False

    def request_body(self, item: ModerationItem) -> dict[str, Any]:
        return request_body(self.config, self.prompts, item)

    def _shards(self) -> list[httpx.AsyncClient]:
        if self._closed:  # aclose() dropped the clients; never open new ones behind its back
            raise EngineDeadError("server engine closed while a request was in flight")
        if not self._clients:
            c = self.config
            k = self.connections_per_client
            self._clients = [
                httpx.AsyncClient(
                    base_url=self._url.rstrip("/"),
                    headers=self._headers,
                    auth=self._auth,
                    timeout=httpx.Timeout(c.timeout_s, connect=c.connect_timeout_s),
                    limits=httpx.Limits(max_connections=k, max_keepalive_connections=k),
                )
                for _ in range(self.http_clients)
            ]
            self._load = [0] * self.http_clients
        return self._clients

    async def _send(self, body: dict[str, Any]) -> httpx.Response:
        """One attempt, on the least-loaded client (a linear scan of ~16 ints: microseconds)."""
        clients = self._shards()
        load = self._load
        i = load.index(min(load))
        load[i] += 1
        try:
            return await clients[i].post("/chat/completions", json=body)
        finally:
            load[i] -= 1

    async def judge(self, item: ModerationItem) -> Verdict:
        if self._closed:
            raise EngineDeadError("server engine is closed")
        parts = expand([item])
        if len(parts) == 1:
            return await self._one(parts[0][1])
        tasks = [asyncio.ensure_future(self._one(it)) for _, it in parts]
        try:
            verdicts = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return combine(verdicts)

    async def _one(self, item: ModerationItem) -> Verdict:
        body = self.request_body(item)
        async with self._slots:
            data = await self._post(body)
        return verdict_from_response(self.prompts, item, data)

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        waits = 0
        mine_since: float | None = None  # this request's first failure
        watch_from = time.monotonic()  # this request's previous failure (its first attempt before one)
        while True:
            if self._closed:
                raise EngineDeadError("server engine closed while a request was in flight")
            unreachable = False
            try:
                async with asyncio.timeout(c.timeout_s):
                    resp = await self._send(body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                unreachable, last = True, f"{type(exc).__name__}: {exc}"
            except (httpx.TransportError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                code = resp.status_code
                if code == 200:
                    self._answered()
                    try:
                        data: dict[str, Any] = resp.json()
                    except ValueError as exc:
                        raise EngineRequestError(f"chat completion is not JSON: {exc}") from None
                    return data
                last = f"HTTP {code}: {resp.text[:300]}"
                if code in _CONFIG_STATUS:
                    # no post could succeed: the configuration is wrong, not this post
                    raise EngineDeadError(
                        f"vLLM server {self.display_url} refused the request ({last}): {_CONFIG_STATUS[code]}"
                    )
                if not _retryable_status(code):
                    self._answered()  # it answered: the server is up, this request is bad
                    raise EngineRequestError(f"chat completion rejected: {last}")
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
                # once per outage, not once per retry of each of up to max_concurrency requests
                log.warning("vllm server failing", server=self.display_url, error=last[:200])
            if mine_since is None:
                mine_since = now
            if self._closed:
                raise EngineDeadError("server engine closed while a request was in flight")
            if self._last_success > watch_from and now - mine_since >= c.dead_after_s:
                # other requests were answered since this one last failed, and it has been failing
                # for dead_after_s: the server is up and it is this request that it cannot serve
                raise EngineRequestError(
                    f"chat completion failed for {now - mine_since:.1f}s while the server answered "
                    f"other requests: {last}"
                )
            failing_for = now - self._failing_since
            if failing_for >= c.dead_after_s:
                # not the post's fault: the server has answered nothing for dead_after_s
                what = "unreachable" if unreachable else "failing every request"
                raise EngineDeadError(
                    f"vLLM server {self.display_url} {what} for {failing_for:.1f}s "
                    f"(GUARDSTREAM_VLLM_SERVER_URL; is `vllm serve` up and healthy?): {last}"
                )
            watch_from = now
            delay = min(c.backoff_max_s, c.backoff_base_s * (2**waits)) * (0.5 + random.random())
            waits += 1
            log.debug(
                "chat completion retry",
                server=self.display_url,
                error=last[:200],
                unreachable=unreachable,
                attempt=waits,
                delay_s=round(delay, 3),
            )
            await asyncio.sleep(delay)

    def _answered(self) -> None:
        """The server answered a request (a completion, or a refusal that is the request's own)."""
        now = time.monotonic()
        self._last_success = now
        if self._failing_since is not None:
            log.info(
                "vllm server answering again",
                server=self.display_url,
                failed_for_s=round(now - self._failing_since, 1),
            )
            self._failing_since = None

    async def aclose(self) -> None:
        self._closed = True
        clients, self._clients = self._clients, []
        # every shard, even if closing one fails (return_exceptions); the first failure is raised after
        results = await asyncio.gather(*(cl.aclose() for cl in clients), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "engine": self.name,
            "server": self.display_url,
            "model": c.model,
            "max_concurrency": c.max_concurrency,
            "http_clients": self.http_clients,
            "connections_per_client": self.connections_per_client,
            "max_in_flight": self.max_in_flight,
            "timeout_s": c.timeout_s,
            "dead_after_s": c.dead_after_s,
        }


class ServerEngine:
    """Batch ``GuardEngine``: a micro-batch fanned out as concurrent requests (the pre-streaming path)."""

    name = "proguard-vllm-server"

    def __init__(self, prompts: PromptSet, config: ServerConfig | None = None) -> None:
        self.config = c = config or ServerConfig()
        self.prompts = prompts
        self.taxonomy = prompts.taxonomy
        self.policy_version = prompts.policy_version
        url, self.display_url, basic = split_credentials(c.base_url)
        self.model_version = f"{c.model}@{self.display_url}"
        headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key else {}
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            timeout=c.timeout_s,
            headers=headers,
            auth=None if c.api_key else basic,
            limits=httpx.Limits(
                max_connections=c.max_concurrency, max_keepalive_connections=c.max_concurrency
            ),
        )
        self._pool = ThreadPoolExecutor(max_workers=c.max_concurrency, thread_name_prefix="chat")

    def request_body(self, item: ModerationItem) -> dict[str, Any]:
        return request_body(self.config, self.prompts, item)

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
                if not _retryable_status(resp.status_code):
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
            parts[i].append(verdict_from_response(self.prompts, it, fut.result()))
        return [combine(p) for p in parts]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()
