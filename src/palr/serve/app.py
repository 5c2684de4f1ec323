"""The PALR HTTP service: `palr serve --run DIR` (FastAPI + uvicorn): a web page at ``/`` and a typed JSON API.

The run is loaded once in the ``lifespan`` handler, never at import; the app only translates HTTP to
:class:`palr.rank.pipeline.PALR` calls. Endpoints: ``GET /`` (the page), ``GET /health``, ``GET /items?q=&limit=``
(title search), ``GET /users``, ``GET /users/{id}``, ``POST /recommend``; schemas in :mod:`palr.api_models`.
A recommendation may start from a user, item ids or titles (``history_titles``, matched fuzzily, the matches
returned); every response carries ``llm`` (who ranked, LLM failures and fallbacks so far). An LLM server that
cannot be reached gives 503 (unless the service was started with ``--allow-fallback``).

Hardening (:class:`ServiceConfig`): a request body limit (413, checked before the body is read), field limits and
``k`` in 1..candidates (422), error messages that never echo large input, an optional bearer token for the API
(401; the page asks for it), CORS off unless origins are given, and a concurrency limit: ``max_concurrent``
requests are computed at once, ``max_queue`` more wait, any further one gets 503 at once.
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


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


class Guard:
    """ASGI middleware: body limit (413) and admission control (503) before the app sees a request."""

    def __init__(self, app: Any, max_body: int, max_concurrent: int, max_queue: int) -> None:
        self.app, self.max_body, self.limit = app, max_body, max_concurrent + max_queue
        self.max_concurrent = max_concurrent
        self.admitted = 0
        self.slots: asyncio.Semaphore | None = None  # created in the server's event loop

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _send_json(send, 413, {"detail": f"request body over {self.max_body:,} bytes"})
            return
        if self.admitted >= self.limit:
            await _send_json(send, 503, {"detail": "the service is saturated; retry shortly"}, {"retry-after": "1"})
            return
        self.admitted += 1
        try:
            # read the whole body first (bounded), so that a chunked upload cannot exceed the limit either
            chunks, size, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] != "http.request":
                    return  # the client went away
                chunks.append(msg.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body:
                    await _send_json(send, 413, {"detail": f"request body over {self.max_body:,} bytes"})
                    return
                more = msg.get("more_body", False)
            body = b"".join(chunks)
            sent = False

            async def replay() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            if self.slots is None:
                self.slots = asyncio.Semaphore(self.max_concurrent)
            async with self.slots:
                await self.app(scope, replay, send)
        finally:
            self.admitted -= 1


def _clean_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors without the offending input (which may be megabytes), at most 10."""

    return [{"loc": [short(str(x), 40) if isinstance(x, str) else x for x in e.get("loc", ())],
             "msg": short(str(e.get("msg", "")), 200), "type": e.get("type", "")} for e in list(errors)[:10]]


def create_app(run: "str | Path | Any", data_dir: "str | Path | None" = None,
               config: ServiceConfig | None = None, llm: "str | None" = None, allow_fallback: bool = False) -> Any:
    """A FastAPI app serving one PALR run (``run`` may also be an already loaded ``PALR``); ``llm`` ranks with
    another model (zero-shot over a retriever run)."""
    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi import Path as PathParam
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse

    from palr.serve.api_models import (
        CatalogItem,
        Health,
        ItemsResponse,
        RecommendRequest,
        RecommendResponse,
        UserResponse,
        UsersResponse,
    )

    cfg = config or ServiceConfig()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]

        state["palr"] = run if isinstance(run, PALR) else PALR.load(run, data_dir, llm=llm, allow_fallback=allow_fallback)
        log.info("serving PALR run %s", state["palr"].run)
        yield
        state.clear()

    app = FastAPI(title="palr", version="1", lifespan=lifespan,
                  description="PALR recommendations: search the catalogue, look up a user, recommend.")

    def authorised(request: Request) -> None:
        if cfg.token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), cfg.token.encode()):
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
    def health() -> Health:
        p = state["palr"]
        return Health(status="ok", run=str(p.run), dataset=p.split.dataset.name, users=p.split.dataset.n_users,
                      items=p.split.dataset.n_items, max_k=p.max_k, auth=cfg.token is not None)

    api = [Depends(authorised)]

    @app.get("/items", response_model=ItemsResponse, dependencies=api)
    def items(q: str = Query("", max_length=200, description="Words that must all appear in the title."),
              limit: int = Query(20, ge=1, le=100)) -> ItemsResponse:
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

    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.add_middleware(Guard, max_body=cfg.max_body_bytes, max_concurrent=cfg.max_concurrent,
                       max_queue=cfg.max_queue)
    return app


def serve(run: "str | Path", config: ServiceConfig | None = None, data_dir: "str | Path | None" = None,
          llm: "str | None" = None, allow_fallback: bool = False) -> None:
    """Run the service in the foreground (``palr serve``); the token falls back to $PALR_TOKEN."""
    import uvicorn

    cfg = config or ServiceConfig()
    if cfg.token is None and os.environ.get("PALR_TOKEN"):
        cfg.token = os.environ["PALR_TOKEN"]
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.token is None:
        log.warning("serving on %s without a token: anyone who can reach it can use the API", cfg.host)

    # load before serving: an incomplete or mismatched run is a PalrError (message, exit 2), not a uvicorn traceback
    loaded = PALR.load(run, data_dir, llm=llm, allow_fallback=allow_fallback)
    uvicorn.run(create_app(loaded, data_dir, cfg), host=cfg.host, port=cfg.port, log_level="info")


__all__ = ["Guard", "ServiceConfig", "create_app", "serve"]
