"""The console's pages (Starlette, server-rendered Jinja2, a little plain JS for keyboard shortcuts).

Safety: Jinja2 autoescaping renders every post field as text; a Content-Security-Policy allows only
this origin's script and style (no inline script), so injected markup could not run even if escaping
failed; forms carry a per-session CSRF token; images are served only for posts in the queue, fetched
through the worker's ``MediaFetcher`` (bucket allow-list, byte and pixel caps) and re-encoded as PNG.
Endpoints are plain functions: Starlette runs them in its thread pool, where blocking Redis, Kafka and
S3 calls belong.
"""

from __future__ import annotations

import hmac
import io
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import structlog

from schemas.extras import MissingExtra

# The web stack is the `console` extra: without it, one line naming the pip install. jinja2 and
# python-multipart are imported here too because starlette imports them lazily (a template render, the
# first form post), which would otherwise fail at the first request instead of at start-up.
try:
    import itsdangerous  # noqa: F401  (starlette's SessionMiddleware)
    import jinja2  # noqa: F401
    import python_multipart  # noqa: F401
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.sessions import SessionMiddleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
    from starlette.templating import Jinja2Templates
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as exc:
    raise MissingExtra("console", (exc.name or "starlette").split(".")[0]) from exc
from guard.taxonomy import Taxonomy
from schemas.events import ImageRef
from workers.console.audits import AuditView
from workers.console.clusters import ClusterView
from workers.console.settings import ConsoleSettings
from workers.console.store import Filters, QueueItem, QueueStore, Reason, StoreBusy
from workers.media import MediaError, MediaFetcher
from workers.reviews import ReviewError, build_review, publish_reviews

log = structlog.get_logger(__name__)
HERE = Path(__file__).resolve().parent
PREVIEW_SIDE = 1024  # images are shown downscaled; the reviewer never receives the original bytes

SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclass
class Console:
    """What the pages need; built once per process by ``create_app``."""

    settings: ConsoleSettings
    store: QueueStore
    taxonomy: Taxonomy
    fetcher: MediaFetcher
    clusters: ClusterView
    audits: AuditView
    publish: Callable[[Any], None]
    tokens: dict[str, str] = field(default_factory=dict)  # token -> reviewer

    def category_groups(self) -> list[tuple[str, str, list[tuple[str, str]]]]:
        return [(c.id, c.name, [(s.id, s.name) for s in c.subcategories]) for c in self.taxonomy.categories]

    def category_label(self, cid: str | None) -> str:
        if not cid:
            return ""
        r = self.taxonomy.resolve(cid)
        if r is None:
            return cid
        return f"{cid} {r.subcategory.name if r.subcategory else r.category.name}"


# ---------------------------------------------------------------------------- identity and CSRF
class AuthError(Exception):
    pass


def reviewer_of(request: Request) -> tuple[str | None, bool]:
    """(reviewer, came from an Authorization header). Header auth is honoured only when configured."""
    c: Console = request.app.state.console
    header = c.settings.console_reviewer_header
    if header:
        proxied = request.headers.get(header, "").strip()
        if proxied:
            return proxied[:128], False
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        owner = _token_owner(c, auth[7:].strip())
        if owner:
            return owner, True
    session = request.session.get("reviewer")
    if session and request.session.get("tokens_epoch") == _epoch(c):
        return str(session), False
    return None, False


def _token_owner(c: Console, token: str) -> str | None:
    for tok, name in c.tokens.items():
        if hmac.compare_digest(tok.encode(), token.encode()):
            return name
    return None


def _epoch(c: Console) -> str:
    # a session is valid only for the token set it was opened with: revoking a token ends its sessions
    return hmac.new(b"epoch", "|".join(sorted(c.tokens)).encode(), "sha256").hexdigest()[:16]


def csrf_token(request: Request) -> str:
    tok = request.session.get("csrf")
    if not tok:
        tok = secrets.token_urlsafe(32)
        request.session["csrf"] = tok
    return str(tok)


async def _check_csrf(request: Request, form: Any, bearer: bool) -> bool:
    if bearer:  # browsers never attach an Authorization header on their own: no cross-site forgery
        return True
    sent = str(form.get("csrf", ""))
    expected = str(request.session.get("csrf", ""))
    return bool(expected) and hmac.compare_digest(sent.encode(), expected.encode())


# ---------------------------------------------------------------------------- rendering
def _console(request: Request) -> Console:
    return request.app.state.console  # type: ignore[no-any-return]


def render(request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> Response:
    c = _console(request)
    reviewer, _ = reviewer_of(request)
    base = {
        "reviewer": reviewer,
        "csrf": csrf_token(request),
        "counts": c.store.counts() if reviewer else {},
        "reasons": [r.value for r in Reason],
        "category_label": c.category_label,
    }
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(request, name, {**base, **ctx}, status_code=status)


def _filters(params: Any) -> Filters:
    def one(name: str) -> str | None:
        v = str(params.get(name, "")).strip()
        return v[:64] or None

    reason = one("reason")
    modality = one("modality")
    return Filters(
        reason=reason if reason in {r.value for r in Reason} else None,
        modality=modality if modality in {"text", "image", "text_image"} else None,
        category=one("category"),
        cluster=one("cluster"),
    )


def _login_redirect(request: Request) -> Response:
    return RedirectResponse("/login?" + urlencode({"next": request.url.path}), status_code=303)


def requires_reviewer(fn: Callable[[Request, str], Response]) -> Callable[[Request], Response]:
    def wrapper(request: Request) -> Response:
        reviewer, _ = reviewer_of(request)
        if reviewer is None:
            if request.method == "GET":
                return _login_redirect(request)
            return PlainTextResponse("sign in first", status_code=401)
        return fn(request, reviewer)

    return wrapper


# ---------------------------------------------------------------------------- pages
def login_page(request: Request) -> Response:
    c = _console(request)
    token = request.query_params.get("token")
    nxt = request.query_params.get("next", "/")
    if not nxt.startswith("/") or nxt.startswith("//"):
        nxt = "/"  # no open redirect
    if token:  # the URL printed at start-up (as Jupyter does); the token leaves the URL at once
        name = _token_owner(c, token)
        if name:
            request.session.update(reviewer=name, tokens_epoch=_epoch(c))
            log.info("console_login", reviewer=name)
            return RedirectResponse(nxt, status_code=303)
    return render(
        request,
        "login.html",
        {"next": nxt, "error": "unknown token" if token else None},
        status=401 if token else 200,
    )


async def login_submit(request: Request) -> Response:
    c = _console(request)
    form = await request.form()
    if not await _check_csrf(request, form, bearer=False):
        return PlainTextResponse("CSRF token missing or wrong: reload the page", status_code=403)
    name = _token_owner(c, str(form.get("token", "")))
    nxt = str(form.get("next", "/"))
    if not nxt.startswith("/") or nxt.startswith("//"):
        nxt = "/"
    if name is None:
        return render(request, "login.html", {"next": nxt, "error": "unknown token"}, status=401)
    request.session.update(reviewer=name, tokens_epoch=_epoch(c))
    return RedirectResponse(nxt, status_code=303)


async def logout(request: Request) -> Response:
    form = await request.form()
    if not await _check_csrf(request, form, bearer=False):
        return PlainTextResponse("CSRF token missing or wrong", status_code=403)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


@requires_reviewer
def queue_page(request: Request, reviewer: str) -> Response:
    c = _console(request)
    f = _filters(request.query_params)
    sort = "newest" if request.query_params.get("sort") == "newest" else "urgent"
    try:
        offset = max(int(request.query_params.get("offset", "0")), 0)
    except ValueError:
        offset = 0
    items, total = c.store.page(f, urgent=sort == "urgent", limit=50, offset=offset)
    holders = {it.post_id: c.store.holder(it.post_id) for it in items}
    return render(
        request,
        "queue.html",
        {
            "items": items,
            "total": total,
            "filters": f,
            "sort": sort,
            "offset": offset,
            "holders": holders,
            "filter_query": urlencode({**f.query(), "sort": sort}),
            "next_query": urlencode(f.query()),
            "recent": c.store.labelled(10),
            "category_groups": c.category_groups(),
            "message": request.query_params.get("msg"),
        },
    )


@requires_reviewer
def next_post(request: Request, reviewer: str) -> Response:
    c = _console(request)
    f = _filters(request.query_params)
    it = c.store.next_for(reviewer, f)
    q = urlencode(f.query())
    if it is None:
        return RedirectResponse(f"/?{urlencode({**f.query(), 'msg': 'queue is clear'})}", status_code=303)
    return RedirectResponse(f"/post/{_quote(it.post_id)}" + (f"?{q}" if q else ""), status_code=303)


def _quote(post_id: str) -> str:
    from urllib.parse import quote

    return quote(post_id, safe="")


def _post_ctx(c: Console, it: QueueItem, reviewer: str, request: Request) -> dict[str, Any]:
    f = _filters(request.query_params)
    claim = c.store.claim(it.post_id, reviewer) if it.is_open else c.store.holder(it.post_id)
    preselect = it.category if (it.category and it.safe is False) else ""
    return {
        "item": it,
        "claim": claim,
        "mine": claim.ok,
        "category_groups": c.category_groups(),
        "preselect": preselect,
        "next_query": urlencode(f.query()),
        "error": None,
    }


@requires_reviewer
def post_page(request: Request, reviewer: str) -> Response:
    c = _console(request)
    it = c.store.get(request.path_params["post_id"])
    if it is None:
        return render(request, "message.html", {"title": "Unknown post", "text": "No such post."}, 404)
    return render(request, "post.html", _post_ctx(c, it, reviewer, request))


async def label_post(request: Request) -> Response:
    reviewer, bearer = reviewer_of(request)
    if reviewer is None:
        return PlainTextResponse("sign in first", status_code=401)
    form = await request.form()
    if not await _check_csrf(request, form, bearer):
        return PlainTextResponse("CSRF token missing or wrong: reload the page", status_code=403)
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(_label, request, reviewer, dict(form))


def _label(request: Request, reviewer: str, form: dict[str, Any]) -> Response:
    c = _console(request)
    post_id = request.path_params["post_id"]
    it = c.store.get(post_id)
    if it is None:  # only posts the console knows (from the topics) can be labelled
        return render(
            request, "message.html", {"title": "Unknown post", "text": f"No post {post_id!r} to label."}, 404
        )

    def refuse(msg: str, status: int) -> Response:
        ctx = _post_ctx(c, it, reviewer, request)
        ctx["error"] = msg
        return render(request, "post.html", ctx, status)

    verdict = str(form.get("verdict", ""))
    if verdict not in ("safe", "unsafe"):
        return refuse("choose safe or unsafe", 400)
    try:
        ev = build_review(
            c.taxonomy,
            post_id=post_id,
            unsafe=verdict == "unsafe",
            category=str(form.get("category", "")),
            novel_risk=str(form.get("novel_risk", ""))[:500],
            note=str(form.get("note", ""))[:1000],
            reviewer_id=reviewer,
        )
    except ReviewError as exc:
        return refuse(str(exc), 400)
    if ev.unsafe and not ev.category and not ev.novel_risk:
        return refuse("an unsafe label needs a category or a description of the risk", 400)
    nxt = "/next" + (f"?{urlencode(_filters(request.query_params).query())}" if request.query_params else "")
    if it.label is not None:
        if it.label.same_decision(ev):  # a re-submitted form: nothing new to publish
            return RedirectResponse(nxt, status_code=303)
        return refuse(
            f"already labelled {it.label.describe()} by {it.label.reviewer_id}; a contradicting label is "
            "refused (ask a lead to re-open it with `guardstream review`)",
            409,
        )
    claim = c.store.claim(post_id, reviewer)
    if not claim.ok:
        return refuse(f"claimed by {claim.holder} for another {claim.expires_in_s:.0f}s", 409)
    try:
        with c.store.submission(post_id):
            # re-read under the lock: a submission that finished meanwhile (a double click) decides
            done = c.store.get(post_id)
            if done is not None and done.label is not None:
                if done.label.same_decision(ev):
                    return RedirectResponse(nxt, status_code=303)
                return refuse(f"already labelled {done.label.describe()} by {done.label.reviewer_id}", 409)
            c.publish(ev)
            c.store.mark_labelled(ev)
    except StoreBusy as exc:
        return refuse(str(exc), 409)
    c.store.release(post_id, reviewer)
    log.info("console_label", post_id=post_id, reviewer=reviewer, unsafe=ev.unsafe, category=ev.category)
    return RedirectResponse(nxt, status_code=303)


async def skip_post(request: Request) -> Response:
    reviewer, bearer = reviewer_of(request)
    if reviewer is None:
        return PlainTextResponse("sign in first", status_code=401)
    form = await request.form()
    if not await _check_csrf(request, form, bearer):
        return PlainTextResponse("CSRF token missing or wrong: reload the page", status_code=403)
    from starlette.concurrency import run_in_threadpool

    await run_in_threadpool(_console(request).store.skip, request.path_params["post_id"], reviewer)
    q = urlencode(_filters(request.query_params).query())
    return RedirectResponse("/next" + (f"?{q}" if q else ""), status_code=303)


@requires_reviewer
def media(request: Request, reviewer: str) -> Response:
    c = _console(request)
    it = c.store.get(request.path_params["post_id"])
    idx = int(request.path_params["index"])
    if it is None or not 0 <= idx < len(it.images):  # never a proxy for arbitrary S3 refs
        return PlainTextResponse("no such image", status_code=404)
    try:
        fetched = c.fetcher.fetch_one(ImageRef.parse(it.images[idx]))
    except (MediaError, ValueError) as exc:
        code = exc.code.value if isinstance(exc, MediaError) else "image_ref_invalid"
        return PlainTextResponse(f"image unavailable: {code}", status_code=422)
    img = fetched.image.copy()
    img.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


@requires_reviewer
def clusters_page(request: Request, reviewer: str) -> Response:
    c = _console(request)
    return render(request, "clusters.html", {"clusters": c.clusters.rows(c.store)})


@requires_reviewer
def audits_page(request: Request, reviewer: str) -> Response:
    c = _console(request)
    return render(request, "audits.html", {"replays": c.audits.replays()})


@requires_reviewer
def audit_page(request: Request, reviewer: str) -> Response:
    c = _console(request)
    rep = c.audits.replay(request.path_params["replay_id"])
    if rep is None:
        return render(request, "message.html", {"title": "Unknown replay", "text": "No such replay."}, 404)
    return render(request, "audit.html", {"r": rep, "known": c.store.get})


def healthz(_request: Request) -> Response:
    return PlainTextResponse("ok")


# ---------------------------------------------------------------------------- the app
def create_app(console: Console) -> Starlette:
    secret = console.settings.console_secret or secrets.token_urlsafe(32)
    app = Starlette(
        routes=[
            Route("/", queue_page),
            Route("/next", next_post),
            Route("/post/{post_id:path}/label", label_post, methods=["POST"]),
            Route("/post/{post_id:path}/skip", skip_post, methods=["POST"]),
            Route("/media/{post_id:path}/{index:int}", media),
            Route("/post/{post_id:path}", post_page),
            Route("/clusters", clusters_page),
            Route("/audits", audits_page),
            Route("/audits/{replay_id}", audit_page),
            Route("/login", login_page),
            Route("/login", login_submit, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/healthz", healthz),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(
                SessionMiddleware,
                secret_key=secret,
                session_cookie="guardstream_console",
                same_site="strict",
                https_only=False,  # loopback by default; put TLS in the proxy in front when exposed
                max_age=12 * 3600,
            ),
        ],
    )
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.autoescape = True
    templates.env.filters["ago"] = _ago
    app.state.console = console
    app.state.templates = templates
    return app


def _ago(t: Any) -> str:
    if t is None:
        return ""
    s = max(time.time() - t.timestamp(), 0)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit} ago"
    return f"{int(s)}s ago"


def build_console(settings: ConsoleSettings, *, publish: Callable[[Any], None] | None = None) -> Console:
    from workers.wiring import build_fetcher

    tokens = settings.tokens
    if not tokens and not settings.console_reviewer_header:
        raise ValueError(
            "the console needs reviewer identities: set GUARDSTREAM_CONSOLE_TOKENS='alice:TOKEN,...' or "
            "GUARDSTREAM_CONSOLE_REVIEWER_HEADER (a header set by your authenticating proxy)"
        )

    def default_publish(ev: Any) -> None:
        publish_reviews(
            settings.kafka.bootstrap_servers, settings.kafka.reviews_topic, [ev], extra=settings.kafka.extra
        )

    return Console(
        settings=settings,
        store=QueueStore(settings.store_url, settings.console_prefix, settings.console_lease_s),
        taxonomy=Taxonomy.load(settings.engine_config.taxonomy_path),
        fetcher=build_fetcher(settings),
        clusters=ClusterView(settings),
        audits=AuditView(settings),
        publish=publish or default_publish,
        tokens=tokens,
    )
