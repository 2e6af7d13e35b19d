"""A continuous-batching model of a vLLM server: the GPU the streaming benchmark drives.

Why a model and not a fixed cost per batch: ProGuard reasons before it answers and its output lengths
are long-tailed, so what decides throughput is how many sequences are running at each decode step.
A static-batch model (fixed + per-item cost per batch) is the one model in which a batch barrier costs
nothing; this one shows the barrier.

The model (constants in ``SimConfig``, loosely a 7B model in bf16 on one H100):

- **Token steps.** Up to ``max_num_seqs`` (128) sequences run; each gains one token per step. A step
  takes ``step_base_ms + step_per_seq_ms · running + prefill`` — 10 ms + 0.12 ms/seq ≈ 25 ms at 128
  sequences (decode of a 7B model is memory-bound: the weights are read once per step whatever the
  batch, the KV reads grow with it).
- **Prefill on admission.** A waiting request is admitted when a slot is free (and the step's prefill
  token budget, vLLM's ``max_num_batched_tokens``, allows); its uncached prompt tokens cost
  ``prefill_per_token_ms`` each in that step and its image's visual tokens ``vision_per_token_ms`` each
  (vision encoder + prefill). The ~700-token system prompt is shared by every request and served from
  the prefix cache, so a text post's prefill is its own words plus the chat template. The admission
  step also produces the first token (as vLLM's prefill step does).
- **Output length** is drawn from the request's content (a hash of the prompt and image bytes), so the
  same post always gets the same length: lognormal with median ``median_output_tokens`` (150) and
  ``output_sigma`` 0.7 (mean ≈ 190, p97 ≈ 560), at least ``min_output_tokens``, capped at the request's
  ``max_tokens`` (a capped output is truncated, ``finish_reason='length'``, as vLLM's would be).
- **Output text** is ProGuard's format (``<think>…</think><answer>Request:…</answer>``) that
  ``guard.parser`` accepts, with the label and category drawn from the same hash, tokenised as Qwen's
  BPE splits "unsafe" ("uns" + "afe") and with per-token top logprobs when asked for.
- **Time** is real (asyncio) but scaled: ``time_scale`` real seconds per modelled second (0.2 → a 25 ms
  step takes 5 ms), so a benchmark runs in seconds. Steps are paced against deadlines, so a late wake-up
  is caught up (the GPU does not wait for the host), up to ``max_lag_ms`` of real time; a host stall
  longer than that is lost GPU time, counted in ``Stats.lag_dropped_s``.

Two faces over one scheduler: ``SimAsyncLLM`` (vLLM v1 ``AsyncLLM``'s interface, for the in-process
``vllm`` engine's injectable factory) and ``bench.sim_server`` (OpenAI chat-completions over HTTP, for
the ``vllm-server`` engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from statistics import NormalDist
from typing import Any

from guard.taxonomy import Taxonomy


@dataclass(frozen=True)
class SimConfig:
    max_num_seqs: int = 128
    step_base_ms: float = 10.0  # weights read once per decode step
    step_per_seq_ms: float = 0.12  # per running sequence (KV reads, sampling)
    prefill_per_token_ms: float = 0.04  # ≈ 25k uncached prompt tokens/s
    vision_per_token_ms: float = 0.08  # vision encoder + prefill per visual token
    max_prefill_tokens_per_step: int = 8192  # vLLM's max_num_batched_tokens (chunked prefill budget)
    template_tokens: int = 30  # chat-template and instruction tokens not in the shared prefix
    pixels_per_visual_token: int = 28 * 28  # Qwen2.5-VL: one token per 28×28 patch (after merge)
    max_visual_tokens: int = 1280  # max_pixels 1280·28·28
    median_output_tokens: float = 150.0
    output_sigma: float = 0.7
    min_output_tokens: int = 32
    max_tokens: int = 1024
    unsafe_fraction: float = 0.2
    time_scale: float = 0.2  # real seconds per modelled second
    max_lag_ms: float = 100.0  # real time the pacer may catch up after a late wake-up

    def step_ms(self, running: int, prefill_tokens: int = 0, visual_tokens: int = 0) -> float:
        """Modelled duration of one step (ms): decode for ``running`` sequences plus admissions' prefill."""
        return (
            self.step_base_ms
            + self.step_per_seq_ms * running
            + self.prefill_per_token_ms * prefill_tokens
            + self.vision_per_token_ms * visual_tokens
        )

    def output_tokens(self, digest: bytes, max_tokens: int | None = None) -> int:
        """Output length for content with this hash: lognormal quantile of the hash, clamped."""
        u = (int.from_bytes(digest[:8], "big") + 0.5) / 2**64
        n = self.median_output_tokens * math.exp(self.output_sigma * NormalDist().inv_cdf(u))
        return min(max(self.min_output_tokens, round(n)), max_tokens or self.max_tokens)

    def uncapped_tokens(self, digest: bytes) -> int:
        return self.output_tokens(digest, max_tokens=1 << 30)


def content_digest(*parts: bytes | str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x00")
    return h.digest()


# --- ProGuard-format output -------------------------------------------------------------------------

_FILLER = (
    "The",
    " user",
    " post",
    " asks",
    " about",
    " a",
    " topic",
    ";",
    " check",
    " it",
    " against",
    " the",
    " policy",
    " categories",
    ".",
    "\n",
)
_VOCAB: dict[str, int] = {}


def token_id(tok: str) -> int:
    """A stable id per token text (a stand-in vocabulary, grown on first use)."""
    tid = _VOCAB.get(tok)
    if tid is None:
        tid = _VOCAB[tok] = len(_VOCAB) + 100
    return tid


@dataclass(frozen=True)
class SimOutput:
    """One generation: its tokens (texts), the decision drawn for it, and why it stopped."""

    tokens: tuple[str, ...]
    unsafe: bool
    category: str | None
    finish_reason: str  # "stop" or "length"

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def top_logprobs(self, i: int) -> dict[str, float]:
        """Top logprobs at position ``i``: the label is confident but not certain, the rest near 1."""
        tok = self.tokens[i]
        if tok == "uns":
            return {"uns": -0.05, "safe": -3.0}
        if tok == "safe" and i > 0 and self.tokens[i - 1] == ":" and self.tokens[i - 2] == "Request":
            return {"safe": -0.05, "uns": -3.0}
        return {tok: -0.01}


ABORTED = SimOutput((), False, None, "abort")


class Categories:
    """Subcategory ids of the shipped taxonomy, so unsafe answers name a category the parser resolves."""

    _ids: tuple[str, ...] = ()

    @classmethod
    def ids(cls) -> tuple[str, ...]:
        if not cls._ids:
            cls._ids = tuple(s.id for c in Taxonomy.load().categories for s in c.subcategories)
        return cls._ids


def proguard_output(
    digest: bytes, n_tokens: int, cfg: SimConfig, *, with_response: bool = True, cut_at: int | None = None
) -> SimOutput:
    """``n_tokens`` tokens of ProGuard-format text: reasoning filler, then the answer block. ``cut_at``
    (the request's max_tokens, when below ``n_tokens``) truncates it there, as a real capped generation:
    the answer block is lost and the parser reports a parse error."""
    unsafe = digest[8] / 256 < cfg.unsafe_fraction
    ids = Categories.ids()
    category = ids[int.from_bytes(digest[9:11], "big") % len(ids)] if unsafe else None
    answer = ["</think>", "\n", "<answer>", "\n", "Request", ":"]
    answer += ["uns", "afe"] if unsafe else ["safe"]
    if with_response:
        answer += ["\n", "Response", ":", "safe"]
    answer += ["\n", "Category", ":", category or "None", "\n", "</answer>"]
    head = ["<think>", "\n"]
    filler_n = max(0, n_tokens - len(head) - len(answer))
    filler = [_FILLER[i % len(_FILLER)] for i in range(filler_n)]
    tokens = head + filler + answer
    truncated = cut_at is not None and cut_at < len(tokens)
    if truncated:
        tokens = tokens[:cut_at]
    return SimOutput(tuple(tokens), unsafe, category, "length" if truncated else "stop")


# --- the scheduler --------------------------------------------------------------------------------


class SimEngineDeadError(RuntimeError):
    """The simulated engine was killed (``GpuSim.kill``): every outstanding and new request fails."""


@dataclass(eq=False)
class SimRequest:
    request_id: str
    digest: bytes
    prefill_tokens: int
    visual_tokens: int
    max_tokens: int
    with_response: bool = True
    future: asyncio.Future[SimOutput] | None = None
    admitted_step: int = -1
    submitted_at: float = 0.0
    finished_at: float = 0.0
    target: int = 0


@dataclass
class Stats:
    """Cumulative counters; ``since(earlier)`` gives a window."""

    steps: int = 0
    token_steps: int = 0  # Σ running sequences over steps (= decode tokens produced)
    modelled_s: float = 0.0  # modelled GPU-busy time
    real_busy_s: float = 0.0  # real time spent in steps
    submitted: int = 0
    completed: int = 0
    aborted: int = 0
    output_tokens: int = 0
    prefill_tokens: int = 0
    visual_tokens: int = 0
    max_running: int = 0
    max_waiting: int = 0
    lag_dropped_s: float = 0.0
    at: float = field(default_factory=time.perf_counter)
    window_s: float = 0.0  # real seconds between the two snapshots of a ``since`` window

    @property
    def mean_running(self) -> float:
        return self.token_steps / self.steps if self.steps else 0.0

    def since(self, earlier: Stats) -> Stats:
        d = Stats(at=self.at)
        for k in (
            "steps",
            "token_steps",
            "modelled_s",
            "real_busy_s",
            "submitted",
            "completed",
            "aborted",
            "output_tokens",
            "prefill_tokens",
            "visual_tokens",
            "lag_dropped_s",
        ):
            setattr(d, k, getattr(self, k) - getattr(earlier, k))
        d.max_running, d.max_waiting = self.max_running, self.max_waiting
        d.window_s = self.at - earlier.at
        return d

    def as_dict(self) -> dict[str, float]:
        out = {k: float(v) for k, v in vars(self).items()}
        out["mean_running"] = self.mean_running
        return out


class GpuSim:
    """The token-step scheduler. Lives on one asyncio loop (bound on first use); not thread-safe."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self._waiting: list[SimRequest] = []
        self._running: dict[str, SimRequest] = {}
        self._ends: list[tuple[int, int, SimRequest]] = []  # (finish step, seq, request) min-heap
        self._seq = itertools.count()
        self._step = 0
        self._stats = Stats()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None
        # (wall-clock end of step, running sequences): mean running over any window, after the fact,
        # comparable across processes (the HTTP face runs in its own)
        self.step_log: deque[tuple[float, int]] = deque(maxlen=2_000_000)

    # public surface ------------------------------------------------------------------------------
    def submit(self, req: SimRequest) -> asyncio.Future[SimOutput]:
        if self._dead is not None:
            raise SimEngineDeadError(str(self._dead))
        loop = asyncio.get_running_loop()
        self._ensure_loop(loop)
        req.future = loop.create_future()
        req.submitted_at = time.perf_counter()
        req.target = self.config.output_tokens(req.digest, req.max_tokens)
        self._waiting.append(req)
        self._stats.submitted += 1
        self._stats.max_waiting = max(self._stats.max_waiting, len(self._waiting))
        assert self._wake is not None
        self._wake.set()
        return req.future

    def output_for(self, req: SimRequest) -> SimOutput:
        full = self.config.uncapped_tokens(req.digest)
        return proguard_output(
            req.digest, full, self.config, with_response=req.with_response, cut_at=req.max_tokens
        )

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request (its slot frees at the next step); its future resolves to
        ``ABORTED``. False if the id is unknown or already finished."""
        for i, r in enumerate(self._waiting):
            if r.request_id == request_id:
                del self._waiting[i]
                self._cancel(r)
                return True
        r2 = self._running.pop(request_id, None)
        if r2 is None:
            return False
        self._cancel(r2)
        return True

    def kill(self, reason: str = "simulated engine death") -> None:
        """The engine dies: every outstanding request fails with ``SimEngineDeadError``, as do new ones."""
        self._dead = SimEngineDeadError(reason)
        for r in [*self._waiting, *self._running.values()]:
            if r.future is not None and not r.future.done():
                r.future.set_exception(SimEngineDeadError(reason))
        self._waiting.clear()
        self._running.clear()
        self._ends.clear()
        if self._task is not None:
            self._task.cancel()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> Stats:
        return replace(self._stats, at=time.perf_counter())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # the step loop -------------------------------------------------------------------------------
    def _cancel(self, r: SimRequest) -> None:
        self._stats.aborted += 1
        if r.future is not None and not r.future.done():
            # as vLLM: the request's stream ends with a final output whose finish_reason is "abort"
            # (cancelling the future would raise CancelledError in a consumer that was not cancelled)
            r.future.set_result(ABORTED)

    def _ensure_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is not None and not self._task.done():
            if self._task.get_loop() is not loop:
                raise RuntimeError("GpuSim is bound to another event loop; make one simulator per loop")
            return
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="gpu-sim")

    def _admit(self) -> tuple[int, int]:
        cfg = self.config
        prefill = visual = 0
        while self._waiting and len(self._running) < cfg.max_num_seqs:
            r = self._waiting[0]
            cost = r.prefill_tokens + r.visual_tokens
            if prefill + visual and prefill + visual + cost > cfg.max_prefill_tokens_per_step:
                break  # the rest waits for the next step's budget
            self._waiting.pop(0)
            r.admitted_step = self._step
            self._running[r.request_id] = r
            heapq.heappush(self._ends, (self._step + r.target - 1, next(self._seq), r))
            prefill += r.prefill_tokens
            visual += r.visual_tokens
        return prefill, visual

    async def _run(self) -> None:
        cfg = self.config
        assert self._wake is not None
        deadline = time.perf_counter()
        while True:
            if not self._waiting and not self._running:
                self._wake.clear()
                await self._wake.wait()
                deadline = time.perf_counter()  # an idle GPU does not bank time
            prefill, visual = self._admit()
            running = len(self._running)
            dt_ms = cfg.step_ms(running, prefill, visual)
            st = self._stats
            st.steps += 1
            st.token_steps += running
            st.modelled_s += dt_ms / 1000
            st.prefill_tokens += prefill
            st.visual_tokens += visual
            st.max_running = max(st.max_running, running)
            real_dt = dt_ms / 1000 * cfg.time_scale
            start = time.perf_counter()
            deadline += real_dt
            late = start - deadline
            if late > cfg.max_lag_ms / 1000:  # a host stall: the GPU sat idle, do not pretend otherwise
                st.lag_dropped_s += late
                deadline = start
            delay = deadline - start
            await asyncio.sleep(delay if delay > 0 else 0)
            st.real_busy_s += time.perf_counter() - start
            self.step_log.append((time.time(), running))
            self._finish_step()
            self._step += 1

    def _finish_step(self) -> None:
        now = time.perf_counter()
        while self._ends and self._ends[0][0] <= self._step:
            _, _, r = heapq.heappop(self._ends)
            if self._running.pop(r.request_id, None) is None:
                continue  # aborted while running
            r.finished_at = now
            self._stats.completed += 1
            self._stats.output_tokens += r.target
            if r.future is not None and not r.future.done():
                r.future.set_result(self.output_for(r))


def mean_running(step_log: Iterable[tuple[float, int]], t0: float, t1: float) -> tuple[float, int]:
    """(mean running sequences per step, steps) over steps that ended in [t0, t1] (wall clock)."""
    n = total = 0
    for t, running in step_log:
        if t0 <= t <= t1:
            n += 1
            total += running
    return (total / n if n else 0.0), n


# --- prompt sizing shared by both faces -----------------------------------------------------------


def text_tokens(text: str) -> int:
    """~4 characters per token (English BPE), the post's own words, not the shared system prompt."""
    return max(1, len(text) // 4)


def visual_token_count(size: tuple[int, int], cfg: SimConfig) -> int:
    width, height = size
    return min(cfg.max_visual_tokens, max(4, (width * height) // cfg.pixels_per_visual_token))


def _user_words(user_turn: str) -> str:
    return user_turn.split("<|im_end|>")[0].replace("<|vision_start|><|image_pad|><|vision_end|>", "").strip()


# --- AsyncLLM's face ------------------------------------------------------------------------------


class RequestOutputKind(IntEnum):
    """vLLM's ``vllm.sampling_params.RequestOutputKind`` values."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class Logprob:
    """vLLM's ``vllm.logprobs.Logprob``."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """vLLM's ``vllm.outputs.CompletionOutput`` (the fields the engines read)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """vLLM's ``vllm.outputs.RequestOutput`` (the fields the engines read)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    outputs: list[CompletionOutput]
    finished: bool


@dataclass
class SimModelConfig:
    """What ``AsyncLLM.get_model_config()`` answers, as far as sampling defaults go: the checkpoint's
    generation_config.json diff (ProGuard-7B inherits Qwen2.5-VL-7B-Instruct's)."""

    model: str = "sim/ProGuard-7B"
    max_model_len: int = 8192
    generation_config: dict[str, Any] = field(
        default_factory=lambda: {"temperature": 1e-06, "top_p": 1.0, "top_k": 1, "repetition_penalty": 1.05}
    )

    def get_diff_sampling_param(self) -> dict[str, Any]:
        return dict(self.generation_config)


class SimAsyncLLM:
    """A stand-in with the surface of vLLM v1's ``AsyncLLM`` (vllm/v1/engine/async_llm.py) that the
    ``vllm`` engine uses: ``generate(prompt, sampling_params, request_id)`` as an async generator of
    ``RequestOutput``, ``abort(request_id)``, ``get_model_config()``, ``shutdown()``, ``errored`` /
    ``dead_error``. The engine kwargs it was built with are kept in ``engine_kwargs`` (tests read them).

    Outputs: with ``output_kind`` FINAL_ONLY one output at the end; otherwise too only the final one
    (vLLM's ``RequestOutputCollector`` merges outputs a slow consumer has not read, so one cumulative
    output at the end is a valid stream — and 128 wake-ups per step would measure this stand-in,
    not the worker). A consumer that stops iterating (cancelled) aborts the request, as AsyncLLM does.
    """

    def __init__(self, sim: GpuSim | None = None, **engine_kwargs: Any) -> None:
        self.engine_kwargs = engine_kwargs
        cfg = sim.config if sim is not None else SimConfig()
        if "max_num_seqs" in engine_kwargs and sim is None:
            cfg = replace(cfg, max_num_seqs=int(engine_kwargs["max_num_seqs"]))
        self.sim = sim or GpuSim(cfg)
        self.model_config = SimModelConfig(
            model=str(engine_kwargs.get("model", "sim/ProGuard-7B")),
            max_model_len=int(engine_kwargs.get("max_model_len", 8192)),
        )
        self.generate_calls = 0
        self._shutdown = False

    @classmethod
    def from_engine_args(cls, engine_args: Any, **_: Any) -> SimAsyncLLM:
        kw = engine_args if isinstance(engine_args, dict) else dict(vars(engine_args))
        return cls(**kw)

    @property
    def errored(self) -> bool:
        return self.sim._dead is not None or self._shutdown

    @property
    def is_running(self) -> bool:
        return not self.errored

    @property
    def dead_error(self) -> BaseException:
        return self.sim._dead or SimEngineDeadError("engine shut down")

    async def get_model_config(self) -> SimModelConfig:
        return self.model_config

    def request_for(self, prompt: Any, sampling_params: Any, request_id: str) -> SimRequest:
        """Size and hash a vLLM prompt: a string, or ``{"prompt": str, "multi_modal_data": {...}}``."""
        cfg = self.sim.config
        if isinstance(prompt, dict):
            text = str(prompt.get("prompt", ""))
            mm = prompt.get("multi_modal_data") or {}
        else:
            text, mm = str(prompt), {}
        images = mm.get("image")
        imgs: Sequence[Any] = images if isinstance(images, list | tuple) else ([images] if images else [])
        parts: list[bytes | str] = [text]
        vis = 0
        for img in imgs:
            parts.append(img.tobytes())
            vis += visual_token_count(img.size, cfg)
        # the shared system prompt is in the prefix cache: only what follows it is prefilled
        user = text.split("<|im_start|>user\n", 1)[-1]
        max_tokens = getattr(sampling_params, "max_tokens", None) or cfg.max_tokens
        return SimRequest(
            request_id=request_id,
            digest=content_digest(*parts),
            prefill_tokens=cfg.template_tokens + text_tokens(user),
            visual_tokens=vis,
            max_tokens=int(max_tokens),
            with_response=not (imgs and not _user_words(user)),  # image-only prompts have no Response
        )

    async def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, **_: Any
    ) -> AsyncGenerator[RequestOutput, None]:
        if self._shutdown:
            raise SimEngineDeadError("AsyncLLM was shut down")
        if request_id in self.sim._running or any(r.request_id == request_id for r in self.sim._waiting):
            raise ValueError(f"request id {request_id} already running")
        self.generate_calls += 1
        req = self.request_for(prompt, sampling_params, request_id)
        fut = self.sim.submit(req)
        try:
            out = await fut
        except asyncio.CancelledError:
            self.sim.abort(request_id)
            raise
        yield self._request_output(req, out, sampling_params, prompt)

    def _request_output(self, req: SimRequest, out: SimOutput, sp: Any, prompt: Any) -> RequestOutput:
        ids = [token_id(t) for t in out.tokens]
        lps: list[dict[int, Logprob]] | None = None
        if getattr(sp, "logprobs", None) is not None:
            lps = []
            for i in range(len(out.tokens)):
                top = sorted(out.top_logprobs(i).items(), key=lambda kv: -kv[1])
                lps.append({token_id(t): Logprob(lp, rank + 1, t) for rank, (t, lp) in enumerate(top)})
        text = prompt.get("prompt") if isinstance(prompt, dict) else str(prompt)
        completion = CompletionOutput(0, out.text, ids, None, lps, out.finish_reason)
        return RequestOutput(req.request_id, text, None, [completion], True)

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            self.sim.abort(rid)

    def shutdown(self) -> None:
        """Abort everything and stop the step loop; callable from any thread (vLLM's is synchronous)."""
        self._shutdown = True
        task = self.sim._task
        if task is None:
            return
        try:
            same_loop = asyncio.get_running_loop() is task.get_loop()
        except RuntimeError:
            same_loop = False
        if same_loop:
            self._stop()
        elif not task.get_loop().is_closed():
            task.get_loop().call_soon_threadsafe(self._stop)

    def _stop(self) -> None:
        for rid in [*self.sim._running, *(r.request_id for r in self.sim._waiting)]:
            self.sim.abort(rid)
        if self.sim._task is not None:
            self.sim._task.cancel()
