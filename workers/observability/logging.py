"""structlog setup: JSON lines in production, a pretty console when attached to a terminal."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from workers.secrets import mask_log_secrets


def configure_logging(fmt: str = "auto", level: str = "INFO") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            mask_log_secrets,  # after exception formatting: a traceback can hold a URL too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # moto's S3 server (the local stack) runs on werkzeug, whose access log would interleave with the
    # demo's tables and the worker's own lines; its warnings and errors still show.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


# librdkafka's own log lines (connection refused, broker down, ...) go to stderr unless a client is given a
# Python logger. Passed as ``logger=`` (or ``"logger"`` in the config dict), confluent-kafka calls the
# logger's ``log(level, "%s [%s] %s", facility, client_name, message)`` from the client's poll/consume
# calls, with the syslog severity already mapped to a ``logging`` level. A wrong bootstrap made the worker
# print thousands of identical lines before it gave up; this routes them through structlog and lets each
# distinct line (digits ignored, so ports and retry counts do not make lines distinct) through at most
# ``burst`` times and then once per ``every_s`` seconds, with the number suppressed in between.
_DIGITS = re.compile(r"\d+")
_MAX_KEYS = 1024


class KafkaLogRouter(logging.Logger):
    def __init__(
        self,
        name: str = "librdkafka",
        *,
        burst: int = 3,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name)
        self.burst, self.every_s, self.clock = burst, every_s, clock
        # per line: (tokens, last refill time, suppressed since the last emitted one)
        self._buckets: dict[str, tuple[float, float, int]] = {}
        self._lock = threading.Lock()
        self._out = structlog.get_logger(name)

    def _admit(self, key: str) -> tuple[bool, int]:
        now = self.clock()
        with self._lock:
            if key not in self._buckets and len(self._buckets) >= _MAX_KEYS:
                self._buckets.clear()  # bounded memory; worst case a few lines get through again
            tokens, last, suppressed = self._buckets.get(key, (float(self.burst), now, 0))
            tokens = min(float(self.burst), tokens + (now - last) / self.every_s)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now, 0)
                return True, suppressed
            self._buckets[key] = (tokens, now, suppressed + 1)
            return False, 0

    def log(self, level: int, msg: object, *args: object, **_kwargs: Any) -> None:
        if len(args) == 3:  # confluent-kafka: facility, client name, message
            facility, client, text = (str(a) for a in args)
        else:
            facility, client, text = "", "", (str(msg) % args if args else str(msg))
        allowed, suppressed = self._admit(facility + " " + _DIGITS.sub("#", text))
        if not allowed:
            return
        fields: dict[str, Any] = {"facility": facility, "client": client, "message": text}
        if suppressed:
            fields["suppressed_since_last"] = suppressed
        self._out.log(level, "librdkafka", **fields)


def kafka_logger(burst: int = 3, every_s: float = 30.0) -> KafkaLogRouter:
    """A logger for confluent-kafka clients: ``Consumer({..., "logger": kafka_logger()})``."""
    return KafkaLogRouter(burst=burst, every_s=every_s)
