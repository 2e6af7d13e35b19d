"""The three kinds of error guardstream raises, by what the worker does next.

Each error the worker acts on derives from exactly one of these, so a handler asks *what to do* rather
than *which module raised it*:

* ``RecordError`` — a fact about one record (malformed JSON, an image that is not an image, a bucket that
  is not allowed). That record becomes a dead letter with the error's stable ``code``; the stream goes on.
* ``InfrastructureError`` — not the post's fault (S3 down, the engine gone). Never a dead letter: the
  worker stops admitting, keeps the affected records uncommitted and retries them with backoff. Only a
  deadline turns it into a ``FatalError``.
* ``FatalError`` — the process stops with the class's ``exit_code``, committing nothing past unfinished
  work (it is re-delivered to whoever consumes the partitions next): ``EXIT_OUTAGE`` (3) for a dependency
  past its deadline or an output the broker did not acknowledge, ``EXIT_CONFIG`` (2) for a configuration
  problem found at start.

Exceptions nobody planned for are none of these: while a record is prepared they dead-letter that record
as ``internal_error`` (the last line of defence), anywhere else they are bugs. Neither is an engine's
failure of one request (``guard.errors.EngineRequestError``): the worker retries it before it gives that
post a dead letter. Errors of the tools around the worker (the CLI's ``CliError``, the local stack's
``StackError``) keep their own handling.
"""

from __future__ import annotations

from typing import ClassVar

from schemas.events import ErrorCode

EXIT_CONFIG = 2  # a configuration problem found at start: waiting does not fix it, the operator does
EXIT_OUTAGE = 3  # a dependency past its deadline, an unacknowledged publish: run again when it is back


class RecordError(Exception):
    """One record is at fault: it is dead-lettered with ``code`` (an ``ErrorCode``, the string downstream
    alerting keys on) and ``message``; nothing else stops. Retrying it would fail the same way."""

    code: ErrorCode
    message: str

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class InfrastructureError(Exception):
    """A dependency is unavailable, not the post: the worker holds the affected records uncommitted,
    stops admitting, and retries with backoff (``/readyz`` 503 meanwhile). Never a dead letter. Past the
    dependency's deadline the worker raises a ``FatalError`` (exit 3) instead."""


class FatalError(Exception):
    """The process stops with ``exit_code`` (``worker_failed`` logged), committing nothing past the
    unfinished work: those records are re-delivered when a worker runs again. Every subclass names its
    ``exit_code`` (``EXIT_OUTAGE`` or ``EXIT_CONFIG``); a subclass without one is refused at definition."""

    exit_code: ClassVar[int]

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        if not isinstance(getattr(cls, "exit_code", None), int):
            raise TypeError(f"{cls.__qualname__}: a FatalError subclass needs a class-level exit_code")
