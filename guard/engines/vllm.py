"""ProGuard in-process on vLLM: ``AsyncVllmEngine`` (the worker's streaming engine, vLLM v1 ``AsyncLLM``)
and ``VllmEngine`` (the batch engine on ``vllm.LLM``, kept for replay and the bench's batch baseline).

Written against vLLM 0.33 (the ``gpu`` extra's pin); the files this follows:
- ``vllm/v1/engine/async_llm.py``: ``AsyncLLM.from_engine_args(AsyncEngineArgs(...))``;
  ``generate(prompt, sampling_params, request_id)`` is an async generator of ``RequestOutput`` whose last
  item has ``finished=True``; cancelling the consumer aborts the request inside vLLM; ``abort(request_id)``
  is a coroutine; ``shutdown()`` is synchronous; a dead engine core raises
  ``vllm.v1.engine.exceptions.EngineDeadError`` (any other failure surfaces as ``EngineGenerateError``).
  ``AsyncLLM.__init__`` may run outside an event loop: the output handler starts on the first ``generate``
  in the loop that calls it, so build the engine on any thread and ``judge`` on the worker's engine loop.
- ``vllm/config/model.py``: ``ModelConfig.get_diff_sampling_param()`` is the checkpoint's
  ``generation_config.json`` sampling defaults (repetition_penalty, temperature, top_k, top_p, min_p,
  max_new_tokens→max_tokens) — what ``vllm serve`` and ``LLM.get_default_sampling_params()`` start from.
  We start from them too and override only temperature, max_tokens, logprobs and seed (issue 15 item 3).
- ``vllm/sampling_params.py``: ``RequestOutputKind.FINAL_ONLY`` (what ``LLM.generate`` uses) so a request
  yields one output when it finishes, not one per token through the worker's event loop.

Stand-ins (tests, the bench's GPU simulator) are injected with ``llm_factory(**engine_kwargs)`` and
``sampling_params_factory(**sampling_kwargs)``. The duck-typed interface ``AsyncVllmEngine`` uses:

    llm = llm_factory(**engine_kwargs)           # engine_kwargs(): exactly the AsyncEngineArgs fields
    llm.model_config.get_diff_sampling_param()   # optional; missing -> {} (no checkpoint defaults)
    llm.generate(prompt=dict, sampling_params=sp, request_id=str) -> AsyncIterator[out]
        prompt: {"prompt": str} or {"prompt": str, "multi_modal_data": {"image": PIL.Image}}
        the generator ends after its final output; the last item yielded is the result
        out.outputs[0].text: str
        out.outputs[0].token_ids: list[int]           (optional, with logprobs for P(unsafe))
        out.outputs[0].logprobs: list[dict[int, obj with .logprob, .decoded_token]] | None
        out.outputs[0].finish_reason: "stop" | "length" | "abort" | None   (optional)
    await llm.abort(request_id)  (or a plain function): the request's generator must then end promptly
        (a final output with finish_reason "abort", an exception, or simply stopping)
    llm.shutdown()               (sync or async)
    llm.errored: bool            (optional; True after the engine died)
    raise an exception whose class name ends in ``EngineDeadError`` (vLLM's, ``guard.errors``', a
        simulator's ``SimEngineDeadError``) from generate when the engine is gone.

With no ``sampling_params_factory`` and an injected ``llm_factory`` the sampling params are a
``types.SimpleNamespace`` of the kwargs (``sp.max_tokens``, ``sp.temperature``, ``sp.logprobs``,
``sp.seed`` and any checkpoint defaults), so a stand-in needs no vLLM.

Defaults are for one H100/H200 and ProGuard-7B (Qwen2.5-VL-7B, bf16 ≈ 16 GB of weights):
- ``max_model_len`` 8192: the system prompt is ~700 tokens, an image at ``max_pixels`` 1280·28·28 is
  ≤ 1280 visual tokens, ``max_tokens`` 1024 (ProGuard's inference.py) — ample headroom.
- prefix caching on: every request in a modality shares the long system prompt, so its KV is computed
  once and reused.
- ``temperature`` 0.0 and ``max_tokens`` 1024 as ProGuard's deploy/inference.py uses.
- ``logprobs`` 5 so P(unsafe) can be read at the ``Request:`` label.
- ``max_in_flight`` 2 × ``max_num_seqs``: vLLM admits a waiting request the step a running one finishes,
  so a second ``max_num_seqs`` queued keeps the running batch full through long-tailed outputs.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import structlog

from guard.chat import combine, expand, p_unsafe_from_logprobs, render, render_qwen2_5_vl, user_text
from guard.config import VllmConfig as VllmConfig
from guard.errors import EngineDeadError, EngineError, EngineRequestError
from guard.parser import parse_output
from guard.prompts import PromptSet
from guard.taxonomy import Taxonomy
from guard.types import ModerationItem, Verdict
from schemas.events import Modality

log = structlog.get_logger(__name__)

_ABORT_TIMEOUT_S = 5.0


# ------------------------------------------------------------------------- shared request/verdict code
def engine_kwargs(c: VllmConfig) -> dict[str, Any]:
    """``vllm.LLM`` / ``AsyncEngineArgs`` keyword arguments (the same fields in both)."""
    kw: dict[str, Any] = {
        "model": c.model,
        "dtype": c.dtype,
        "max_model_len": c.max_model_len,
        "gpu_memory_utilization": c.gpu_memory_utilization,
        "max_num_seqs": c.max_num_seqs,
        "tensor_parallel_size": c.tensor_parallel_size,
        "limit_mm_per_prompt": {"image": c.images_per_prompt},
        "mm_processor_kwargs": {"min_pixels": c.min_pixels, "max_pixels": c.max_pixels},
        "enable_prefix_caching": c.enable_prefix_caching,
        "seed": c.seed,
    }
    if c.revision:
        kw["revision"] = c.revision
    return kw


def model_sampling_defaults(llm: Any) -> dict[str, Any]:
    """The checkpoint's generation_config sampling defaults as vLLM reads them, ``{}`` if unavailable.

    ``AsyncLLM.model_config`` and ``LLM.llm_engine.model_config`` are the same ``ModelConfig``."""
    mc = getattr(llm, "model_config", None)
    if mc is None:
        mc = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    get = getattr(mc, "get_diff_sampling_param", None)
    if get is None:
        return {}
    return dict(get() or {})


def sampling_kwargs(c: VllmConfig, defaults: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint defaults (repetition penalty, top_p/top_k...) with only our four overrides on top."""
    return {
        **defaults,
        "temperature": c.temperature,
        "max_tokens": c.max_tokens,
        "logprobs": c.top_logprobs,
        "seed": c.seed,
    }


def build_request(prompts: PromptSet, item: ModerationItem) -> dict[str, Any]:
    images = list(item.images)
    r = render(prompts, item)
    req: dict[str, Any] = {"prompt": render_qwen2_5_vl(r.system, user_text(r), len(images))}
    if images:
        req["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
    return req


def verdict_from_completion(taxonomy: Taxonomy, item: ModerationItem, completion: Any) -> Verdict:
    v = parse_output(completion.text, taxonomy, image_only=item.modality is Modality.IMAGE)
    tokens, tops = _vllm_logprobs(completion)
    v.p_unsafe = p_unsafe_from_logprobs(tokens, tops)
    return v


def _vllm_logprobs(completion: Any) -> tuple[list[str], list[dict[str, float]]]:
    """vLLM's ``CompletionOutput.logprobs`` (list of {token_id: Logprob}) → (tokens, top-k by text)."""
    lps = getattr(completion, "logprobs", None)
    ids = list(getattr(completion, "token_ids", []) or [])
    if not lps or len(lps) != len(ids):
        return [], []
    tokens: list[str] = []
    tops: list[dict[str, float]] = []
    for tid, pos in zip(ids, lps, strict=True):
        chosen = pos.get(tid)
        tokens.append((chosen.decoded_token or "") if chosen is not None else "")
        tops.append({(lp.decoded_token or ""): float(lp.logprob) for lp in pos.values()})
    return tokens, tops


def _is_engine_dead(exc: BaseException) -> bool:
    """vLLM's ``EngineDeadError`` (or a stand-in's ``...EngineDeadError``) anywhere in the cause chain.

    Matched by name so this module needs no vLLM import, and so a bench stand-in can signal it too."""
    seen: BaseException | None = exc
    while seen is not None:
        if any(k.__name__.endswith("EngineDeadError") for k in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# --------------------------------------------------------------------------------- streaming engine
def _async_llm_from_kwargs(**kw: Any) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))


def _final_only_sampling_params(**kw: Any) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    # one RequestOutput per request (at the end) instead of one per generated token
    return SamplingParams(**kw, output_kind=RequestOutputKind.FINAL_ONLY)


class AsyncVllmEngine:
    """``StreamingEngine`` on vLLM's ``AsyncLLM``: one ``generate`` per prompt, completing out of order."""

    name = "proguard-vllm"

    def __init__(
        self,
        prompts: PromptSet,
        config: VllmConfig | None = None,
        llm_factory: Callable[..., Any] | None = None,
        sampling_params_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.config = c = config or VllmConfig()
        self.prompts = prompts
        self.taxonomy = prompts.taxonomy
        self.policy_version = prompts.policy_version
        self.model_version = f"{c.model}@{c.revision or 'local'}"
        self.max_in_flight = c.max_in_flight or 2 * c.max_num_seqs
        if llm_factory is None:
            import vllm  # the [gpu] extra

            llm_factory = _async_llm_from_kwargs
            sampling_params_factory = sampling_params_factory or _final_only_sampling_params
            self.model_version += f";vllm=={vllm.__version__}"
        self.llm = llm_factory(**engine_kwargs(c))
        self.sampling = sampling_kwargs(c, model_sampling_defaults(self.llm))
        self.sampling_params = (sampling_params_factory or SimpleNamespace)(**self.sampling)
        # request ids: unique per process and engine instance (vLLM rejects a duplicate live id)
        self._id_prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count()
        self._live: set[str] = set()
        self._closed = False
        log.info(
            "vllm engine ready",
            model_version=self.model_version,
            max_in_flight=self.max_in_flight,
            sampling=self.sampling,
        )

    def build_request(self, item: ModerationItem) -> dict[str, Any]:
        return build_request(self.prompts, item)

    async def judge(self, item: ModerationItem) -> Verdict:
        if self._closed:
            raise EngineDeadError("vLLM engine is closed")
        parts = expand([item], self.config.images_per_prompt)
        if len(parts) == 1:
            return await self._generate(parts[0][1])
        # a multi-image post: one request per image, all in flight together, one combined verdict
        tasks = [asyncio.ensure_future(self._generate(it)) for _, it in parts]
        try:
            verdicts = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()  # each cancelled _generate aborts its own request
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return combine(verdicts)

    async def _generate(self, item: ModerationItem) -> Verdict:
        rid = f"{self._id_prefix}-{next(self._ids)}-{item.post_id}"
        request = self.build_request(item)
        final: Any = None
        self._live.add(rid)
        stream = self.llm.generate(prompt=request, sampling_params=self.sampling_params, request_id=rid)
        try:
            # read to the end, not just to ``finished``: leaving vLLM's generator early would make it
            # send an abort RPC for a request that already finished
            async for out in stream:
                final = out
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling() == 0:
                # nobody cancelled us: the engine cancelled the request (a stand-in's abort/shutdown)
                raise self._error(None, rid, "request was cancelled by the engine") from None
            # our caller cancelled: vLLM's generate aborts on cancellation itself; a stand-in may not,
            # and a double abort is a no-op in vLLM (unknown ids are ignored)
            await self._abort(rid)
            raise
        except EngineError:
            raise
        except Exception as exc:
            raise self._error(exc, rid) from exc
        finally:
            self._live.discard(rid)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        outputs = getattr(final, "outputs", None)
        if not outputs:
            raise self._error(None, rid, "request ended without an output")
        completion = outputs[0]
        if getattr(completion, "finish_reason", None) == "abort":
            raise self._error(None, rid, "request was aborted by the engine")
        return verdict_from_completion(self.taxonomy, item, completion)

    def _error(self, exc: BaseException | None, rid: str, what: str = "") -> EngineError:
        detail = what or f"{type(exc).__name__}: {exc}"
        if self._closed:
            # shutting down: the post was not judged, which is nobody's fault (it stays uncommitted)
            return EngineDeadError(f"vLLM engine closed while request {rid} was in flight")
        if (exc is not None and _is_engine_dead(exc)) or getattr(self.llm, "errored", False) is True:
            return EngineDeadError(f"vLLM engine died (request {rid}): {detail}")
        return EngineRequestError(f"vLLM request {rid} failed: {detail}")

    async def _abort(self, rid: str) -> None:
        try:
            res = self.llm.abort(rid)
            if inspect.isawaitable(res):
                # bounded: an engine core that died mid-shutdown must not hang a cancellation
                await asyncio.wait_for(res, _ABORT_TIMEOUT_S)
        except Exception as exc:  # an engine already gone cannot abort; nothing is left to free
            log.warning("vllm abort failed", request_id=rid, error=f"{type(exc).__name__}: {exc}")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        live = sorted(self._live)
        for rid in live:
            await self._abort(rid)
        log.info("vllm engine closing", aborted=len(live))
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            res = shutdown()
            if inspect.isawaitable(res):
                await res

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, **self.config.describe_fields(), "sampling": self.sampling}


# ------------------------------------------------------------------------------------- batch engine
class VllmEngine:
    """Batch ``GuardEngine`` on ``vllm.LLM``: one ``generate`` per micro-batch (the pre-streaming path)."""

    name = "proguard-vllm"

    def __init__(
        self,
        prompts: PromptSet,
        config: VllmConfig | None = None,
        llm_factory: Callable[..., Any] | None = None,
        sampling_params_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.config = config or VllmConfig()
        self.prompts = prompts
        self.taxonomy = prompts.taxonomy
        self.policy_version = prompts.policy_version
        self.model_version = f"{self.config.model}@{self.config.revision or 'local'}"
        if llm_factory is None or sampling_params_factory is None:
            import vllm  # the [gpu] extra

            llm_factory = llm_factory or vllm.LLM
            sampling_params_factory = sampling_params_factory or vllm.SamplingParams
            self.model_version += f";vllm=={vllm.__version__}"
        self.llm = llm_factory(**self.engine_kwargs())
        self.sampling = sampling_kwargs(self.config, model_sampling_defaults(self.llm))
        self.sampling_params = sampling_params_factory(**self.sampling)

    def engine_kwargs(self) -> dict[str, Any]:
        return engine_kwargs(self.config)

    def build_request(self, item: ModerationItem) -> dict[str, Any]:
        return build_request(self.prompts, item)

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        expanded = expand(batch, self.config.images_per_prompt)
        requests = [self.build_request(it) for _, it in expanded]
        try:
            outputs = self.llm.generate(requests, sampling_params=self.sampling_params, use_tqdm=False)
        except Exception as exc:  # CUDA OOM, engine dead...: the worker retries and bisects
            raise EngineError(f"vLLM generate failed: {type(exc).__name__}: {exc}") from exc
        if len(outputs) != len(requests):
            raise EngineError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        parts: list[list[Verdict]] = [[] for _ in batch]
        for (i, it), out in zip(expanded, outputs, strict=True):
            parts[i].append(verdict_from_completion(self.taxonomy, it, out.outputs[0]))
        return [combine(p) for p in parts]

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, **self.config.describe_fields(), "sampling": self.sampling}

    def close(self) -> None:
        self.llm = None
