"""Run the console: the ingester thread and the ASGI app under uvicorn, in one process."""

from __future__ import annotations

import contextlib
import secrets
import sys
import threading
import time
from typing import Any

import structlog

from schemas.extras import MissingExtra

try:
    import uvicorn
except ImportError as exc:  # the `console` extra: one line naming `pip install 'guardstream[console]'`
    raise MissingExtra("console", "uvicorn") from exc

from workers.console.app import build_console, create_app
from workers.console.ingest import Ingester
from workers.console.settings import ConsoleSettings

log = structlog.get_logger(__name__)


class ConsoleServer:
    """``start()`` runs everything on background threads (tests, the demo); ``serve()`` in the
    foreground until Ctrl-C (``guardstream console``)."""

    def __init__(self, settings: ConsoleSettings, *, ingest: bool = True) -> None:
        self.settings = settings
        self.console = build_console(settings)
        self.app = create_app(self.console)
        self.ingester = Ingester(settings, self.console.store) if ingest else None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def _uvicorn(self) -> uvicorn.Server:
        cfg = uvicorn.Config(
            self.app,
            host=self.settings.console_host,
            port=self.settings.console_port,
            log_level="warning",
            access_log=False,
            proxy_headers=False,  # identity comes only from the configured header, never X-Forwarded-*
            server_header=False,
        )
        return uvicorn.Server(cfg)

    @property
    def url(self) -> str:
        assert self._server is not None
        sockets = [s for srv in getattr(self._server, "servers", []) for s in srv.sockets]
        port = sockets[0].getsockname()[1] if sockets else self.settings.console_port
        return f"http://{self.settings.console_host}:{port}"

    def start(self, timeout_s: float = 20.0) -> ConsoleServer:
        if self.ingester is not None:
            self.ingester.start()
        self._server = self._uvicorn()
        self._thread = threading.Thread(target=self._server.run, name="console-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:  # uvicorn's own readiness flag, set once the socket listens
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"console did not start on {self.settings.console_host}")
            time.sleep(0.02)
        log.info("console_started", url=self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        if self.ingester is not None:
            self.ingester.stop()
        self.console.fetcher.close()

    def serve(self) -> None:
        if self.ingester is not None:
            self.ingester.start()
        try:
            self._server = self._uvicorn()
            self._server.run()
        finally:
            if self.ingester is not None:
                self.ingester.stop()
            self.console.fetcher.close()


def with_default_token(settings: ConsoleSettings, reviewer: str) -> tuple[ConsoleSettings, str | None]:
    """No identity configured: make a one-time token for ``reviewer`` (printed as a login URL, as
    Jupyter does) rather than run an open console."""
    if settings.tokens or settings.console_reviewer_header:
        return settings, None
    token = secrets.token_urlsafe(24)
    return settings.model_copy(update={"console_tokens": f"{reviewer}:{token}"}), token


def login_url(server: ConsoleServer, token: str | None) -> str:
    return f"{server.url}/login?token={token}" if token else server.url


def run_blocking(settings: ConsoleSettings, reviewer: str, printer: Any = print, fresh: bool = False) -> int:
    settings, token = with_default_token(settings, reviewer)
    server = ConsoleServer(settings)
    if fresh:
        server.console.store.clear()
    host = settings.console_host
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("console_exposed", host=host, hint="put it behind TLS and an authenticating proxy")
    url = f"http://{host}:{settings.console_port}"
    printer(f"review console: {url}/login?token={token}" if token else f"review console: {url}")
    sys.stdout.flush()  # the URL must reach a piped stdout before the server blocks
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn shuts down on Ctrl-C, then re-raises it
        server.serve()
    return 0
