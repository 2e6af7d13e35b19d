"""Engine errors: one request failed, or the engine is gone.

The split decides whose fault it is (see ``schemas.errors`` for the three kinds):

* ``EngineRequestError`` — one request failed (a 400 "prompt too long", an answer that is not a chat
  completion, one input that does not fit in GPU memory). The post's: the worker retries it alone
  (``ENGINE_RETRIES``) and then dead-letters that post only (``engine_failed``). It is not a
  ``RecordError``: it is retried before it becomes a dead letter, and any other exception an engine raises
  for one request is treated the same way, so the dead letter's code is the engine loop's to give.
* ``EngineDeadError`` — an ``InfrastructureError``: the engine itself is gone (server failing every
  request, a CUDA error, engine core died). No post is blamed: admission stops, the posts stay uncommitted
  and are re-submitted with backoff; past ``ENGINE_DEADLINE_S`` the worker exits 3.
* ``EngineError`` — their base, and on its own a failure of a whole batch (a batch-native engine's batch
  OOM, a shape error): the batch is re-run item by item so only a poison post fails.
"""

from __future__ import annotations

from schemas.errors import InfrastructureError


class EngineError(RuntimeError):
    """The engine failed on a whole batch (device error, server down...). The worker retries/bisects."""


class EngineRequestError(EngineError):
    """One request failed (a timeout, a 4xx/5xx for that request, a bad output shape). Retryable per
    request; a post that keeps failing becomes a dead letter (``engine_failed``)."""


class EngineDeadError(EngineError, InfrastructureError):
    """The engine itself is gone (server unreachable, CUDA error, engine core died). Not a property of
    any post: the worker stops taking work, commits nothing past it, and waits or exits per config."""
