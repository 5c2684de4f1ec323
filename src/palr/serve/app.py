"""The PALR HTTP service: `palr serve --run DIR` (FastAPI + uvicorn): a web page at ``/`` and a typed JSON API.

The run is loaded once in the ``lifespan`` handler, never at import; the app only translates HTTP to
:class:`palr.rank.pipeline.PALR` calls. Endpoints: ``GET /`` (the page), ``GET /health``, ``GET /items?q=&limit=``
(title search), ``GET /users``, ``GET /users/{id}``, ``POST /recommend``; schemas in :mod:`palr.api_models`.
A recommendation may start from a user, item ids or titles (``history_titles``, matched fuzzily, the matches
returned); every response carries ``llm`` (who ranked, LLM failures and fallbacks so far). An LLM server that
cannot be reached gives 503 (unless the service was started with ``--allow-fallback``).

Hardening (:class:`ServiceConfig`, :class:`Guard`), in the order a request meets it: an optional bearer token for
the API (401; the page asks for it), a request body limit (413, checked before the body is read), the body read
whole under a deadline (408 after ``body_timeout`` s), and only then admission: ``max_concurrent`` requests are
computed at once, ``max_queue`` more wait, any further one gets 503 at once; so a client that withholds its body,
or has no token, never holds a compute slot. ``GET /health`` reports the slots in use (and never the run's path).
Request cost is bounded before any work: field limits, at most 100 titles of 200 characters (12,000 in all),
``k`` in 1..candidates, at most 10 search words (422); error messages never echo large input. Under uvicorn
(:func:`uvicorn_config`) a connection that sends no whole request head within ``body_timeout`` s is closed, idle
keep-alive connections after ``keep_alive`` s, and at most ``max_connections`` are open. Every response carries
``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` and a
Content-Security-Policy (the page loads only its own script and style). CORS is off unless origins are given.
"""

# No `from __future__ import annotations`: FastAPI resolves the endpoint annotations at definition time.
import asyncio
import hmac
import json
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from palr.core.errors import InputError, LLMUnavailable, PalrError, UnknownUserError
from palr.core.settings import (
    ServiceConfig,  # the settings of `palr serve`, defined with every other command's
)
from palr.rank.pipeline import MAX_USER_ID, PALR, short

log = logging.getLogger(__name__)
WEB = Path(__file__).parent / "web"  # index.html, app.js, app.css: no build step


PUBLIC = frozenset({"/", "/health", "/static/app.js", "/static/app.css", "/favicon.ico", "/docs",
                    "/docs/oauth2-redirect", "/redoc", "/openapi.json"})  # open even with --token
# the page loads /static/app.js and app.css and calls the API: nothing inline, nothing from elsewhere
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# /docs and /redoc: FastAPI's pages load Swagger UI / ReDoc from jsDelivr and start them with an inline script
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
            "font-src https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
            "worker-src blob:; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


def token_ok(headers: dict[bytes, bytes], token: str) -> bool:
    """Whether ``Authorization: Bearer <token>`` is there (compared in constant time)."""
    scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode("latin-1"), token.encode())


class Admission:
    """The compute slots, shared by :class:`Guard` (which admits) and ``GET /health`` (which reports them):
    ``max_concurrent`` requests compute at once, ``max_queue`` more wait, a further one gets 503."""

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.admitted = 0  # computing or waiting for a slot
        self.running = 0
        self.rejected = 0  # 503s since the start
        self._slots: asyncio.Semaphore | None = None  # created in the server's event loop

    @property
    def full(self) -> bool:
        return self.admitted >= self.max_concurrent + self.max_queue

    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent)
        return self._slots

    def snapshot(self) -> dict[str, int]:
        return {"in_use": self.running, "max_concurrent": self.max_concurrent,
                "waiting": self.admitted - self.running, "max_queue": self.max_queue, "rejected": self.rejected}


class Guard:
    """ASGI middleware in front of the app. In this order, so that nothing a client withholds holds a compute
    slot: the bearer token (401), the declared body size (413), the whole body read under a deadline (413 when
    too large, 408 when too slow), and only then admission (503 when every slot and queue place is taken).
    Every response gets the security headers (nosniff, frame DENY, no referrer, a Content-Security-Policy)."""

    def __init__(self, app: Any, config: ServiceConfig, admission: Admission) -> None:
        self.app, self.cfg, self.admission = app, config, admission

    @staticmethod
    def _secured(send: Any, path: str) -> Any:
        csp = DOCS_CSP if path in ("/docs", "/redoc") else CSP
        extra = [*SECURITY_HEADERS, (b"content-security-policy", csp.encode())]

        async def secured(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return secured

    async def _read_body(self, receive: Any, send: Any) -> bytes | None:
        """The whole body (bounded), or None when the client went away or it was too large (answered)."""
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return None  # the client went away
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.cfg.max_body_bytes:
                await _send_json(send, 413, {"detail": f"request body over {self.cfg.max_body_bytes:,} bytes"},
                                 {"connection": "close"})
                return None
            more = msg.get("more_body", False)
        return b"".join(chunks)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        send = self._secured(send, path)
        if path == "/health":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.cfg.token is not None and path not in PUBLIC and not token_ok(headers, self.cfg.token):
            await _send_json(send, 401, {"detail": "missing or wrong bearer token"},
                             {"www-authenticate": "Bearer", "connection": "close"})
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.cfg.max_body_bytes):
            await _send_json(send, 413, {"detail": f"request body over {self.cfg.max_body_bytes:,} bytes"},
                             {"connection": "close"})
            return
        # read the whole body first, bounded in size (a chunked upload cannot exceed the limit either) and in time
        try:
            body = await asyncio.wait_for(self._read_body(receive, send), self.cfg.body_timeout)
        except TimeoutError:
            await _send_json(send, 408, {"detail": f"the request body did not arrive within "
                                                   f"{self.cfg.body_timeout:g} s"}, {"connection": "close"})
            return
        if body is None:
            return
        adm = self.admission
        if adm.full:
            adm.rejected += 1
            await _send_json(send, 503, {"detail": "the service is saturated; retry shortly"}, {"retry-after": "1"})
            return
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        adm.admitted += 1
        try:
            async with adm.slots():
                adm.running += 1
                try:
                    await self.app(scope, replay, send)
                finally:
                    adm.running -= 1
        finally:
            adm.admitted -= 1


def _clean_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors without the offending input (which may be megabytes), at most 10."""

    return [{"loc": [short(str(x), 40) if isinstance(x, str) else x for x in e.get("loc", ())],
             "msg": short(str(e.get("msg", "")), 200), "type": e.get("type", "")} for e in list(errors)[:10]]


def create_app(run: "str | Path | Any", data_dir: "str | Path | None" = None,
               config: ServiceConfig | None = None, llm: "str | None" = None, allow_fallback: bool = False,
               trust_run_llm: bool = False) -> Any:
    """A FastAPI app serving one PALR run (``run`` may also be an already loaded ``PALR``); ``llm`` ranks with
    another model (zero-shot over a retriever run)."""
    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi import Path as PathParam
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse

    from palr.serve.api_models import (
        MAX_QUERY_WORDS,
        CatalogItem,
        Health,
        ItemsResponse,
        RecommendRequest,
        RecommendResponse,
        Slots,
        UserResponse,
        UsersResponse,
    )

    cfg = config or ServiceConfig()
    state: dict[str, Any] = {}
    admission = Admission(cfg.max_concurrent, cfg.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]

        state["palr"] = run if isinstance(run, PALR) else PALR.load(run, data_dir, llm=llm, allow_fallback=allow_fallback,
                                                                       trust_run_llm=trust_run_llm)
        log.info("serving PALR run %s", state["palr"].run)
        yield
        state.clear()

    app = FastAPI(title="palr", version="1", lifespan=lifespan,
                  description="PALR recommendations: search the catalogue, look up a user, recommend.")

    def authorised(request: Request) -> None:
        # the Guard has checked already; this keeps the endpoints closed if the app is mounted without it
        if cfg.token is not None and not token_ok(dict(request.scope.get("headers") or []), cfg.token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": _clean_errors(exc.errors())})

    def catalog_item(p: Any, i: int) -> CatalogItem:
        return CatalogItem(item=p.catalog.item_ids[i], title=p.catalog.titles[i], tags=p.catalog.tags(i),
                           popularity=int(p.popularity[i]))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB / "index.html", headers={"cache-control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        if name not in {"app.js", "app.css"}:
            raise HTTPException(404, "no such file")
        return FileResponse(WEB / name, headers={"cache-control": "no-cache"})

    @app.get("/health", response_model=Health)
    async def health() -> Health:  # async: answered on the event loop, never waits for a worker thread
        p = state["palr"]
        return Health(status="saturated" if admission.full else "ok", run=Path(p.run).name,
                      dataset=p.split.dataset.name, users=p.split.dataset.n_users, items=p.split.dataset.n_items,
                      max_k=p.max_k, auth=cfg.token is not None, slots=Slots(**admission.snapshot()))

    api = [Depends(authorised)]

    @app.get("/items", response_model=ItemsResponse, dependencies=api)
    def items(q: str = Query("", max_length=200, description="Words that must all appear in the title."),
              limit: int = Query(20, ge=1, le=100)) -> ItemsResponse:
        if len(set(q.lower().split())) > MAX_QUERY_WORDS:
            raise HTTPException(422, f"a search holds at most {MAX_QUERY_WORDS} different words")
        p = state["palr"]
        total, hits = p.search(q, limit)
        return ItemsResponse(query=q, total=total, items=[catalog_item(p, i) for i in hits])

    @app.get("/users", response_model=UsersResponse, dependencies=api)
    def users(limit: int = Query(50, ge=1, le=1000)) -> UsersResponse:
        ds = state["palr"].split.dataset
        return UsersResponse(total=ds.n_users, users=ds.user_ids[:limit])

    @app.get("/users/{user}", response_model=UserResponse, dependencies=api)
    def user(user: str = PathParam(..., max_length=MAX_USER_ID)) -> UserResponse:
        p = state["palr"]
        try:
            hist = p.user_history(user)
        except UnknownUserError as e:
            raise HTTPException(404, str(e)) from None
        return UserResponse(user=user, profile=p.profile_text(hist) or "",
                            history=[catalog_item(p, int(i)) for i in hist])

    @app.post("/recommend", response_model=RecommendResponse, dependencies=api)
    def recommend(req: RecommendRequest) -> dict[str, Any]:
        try:
            return state["palr"].recommend(user=req.user, history=req.history, k=req.k, explain=req.explain,
                                           history_titles=req.history_titles).to_dict()
        except LLMUnavailable as e:
            raise HTTPException(503, str(e)) from None
        except UnknownUserError as e:
            raise HTTPException(404, str(e)) from None
        except InputError as e:
            raise HTTPException(422, str(e)) from None
        except PalrError as e:
            raise HTTPException(400, str(e)) from None

    app.add_middleware(Guard, config=cfg, admission=admission)
    if cfg.cors_origins:  # added last, so outermost: preflights never need the token, and a 401 carries CORS
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    return app


def _header_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline on request heads: a connection that has not sent a whole request
    head ``seconds`` after it opened (or after its last response) is closed. uvicorn's keep-alive timer alone is
    reset by every byte, so a client sending its headers a byte at a time would hold a connection forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):  # type: ignore[misc]
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._head_late)

        def _head_late(self) -> None:
            self._head_timer = None
            busy = self.cycle is not None and not self.cycle.response_complete
            if not busy and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no request head (or only part of one) within the deadline

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    return HeaderDeadlineProtocol


def uvicorn_config(app: Any, config: ServiceConfig | None = None, **overrides: Any) -> Any:
    """uvicorn's settings for the service: request heads due within ``body_timeout`` s (the connection is closed
    otherwise), idle keep-alive connections closed after ``keep_alive`` s, at most ``max_connections`` open
    connections (more get 503), heads of at most 16 KiB, no server banner."""
    import uvicorn

    cfg = config or ServiceConfig()
    kw: dict[str, Any] = {"host": cfg.host, "port": cfg.port, "log_level": "info", "timeout_keep_alive": cfg.keep_alive,
                          "limit_concurrency": cfg.max_connections, "h11_max_incomplete_event_size": 16 * 1024,
                          "server_header": False, "lifespan": "on", "http": _header_deadline_protocol(cfg.body_timeout)}
    return uvicorn.Config(app, **(kw | overrides))


def serve(run: "str | Path", config: ServiceConfig | None = None, data_dir: "str | Path | None" = None,
          llm: "str | None" = None, allow_fallback: bool = False, trust_run_llm: bool = False) -> None:
    """Run the service in the foreground (``palr serve``); the token falls back to $PALR_TOKEN."""
    import uvicorn

    cfg = config or ServiceConfig()
    if cfg.token is None and os.environ.get("PALR_TOKEN"):
        cfg.token = os.environ["PALR_TOKEN"]
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.token is None:
        log.warning("serving on %s without a token: anyone who can reach it can use the API", cfg.host)

    # load before serving: an incomplete or mismatched run is a PalrError (message, exit 2), not a uvicorn traceback
    loaded = PALR.load(run, data_dir, llm=llm, allow_fallback=allow_fallback, trust_run_llm=trust_run_llm)
    uvicorn.Server(uvicorn_config(create_app(loaded, data_dir, cfg), cfg)).run()


__all__ = ["Admission", "Guard", "ServiceConfig", "create_app", "serve", "uvicorn_config"]
