"""The PALR HTTP service: `palr serve --run DIR` (FastAPI + uvicorn).

The run is loaded once in the ``lifespan`` handler, never at import; the app only translates JSON to
:meth:`palr.pipeline.PALR.recommend` calls. Endpoints: ``GET /health``, ``POST /recommend``
(``{"user": "42"}`` or ``{"history": ["1", "50"]}``, ``k``, ``explain``).
"""

# No `from __future__ import annotations`: FastAPI resolves the request models at definition time.
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def create_app(run: "str | Path | Any", data_dir: "str | Path | None" = None) -> Any:
    """A FastAPI app serving one PALR run (``run`` may also be an already loaded ``PALR``)."""
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel, Field

    from palr.errors import PalrError

    class RecommendRequest(BaseModel):
        user: str | None = Field(None, description="A known user id (their whole history is used).")
        history: list[str] | None = Field(None, description="Item ids, oldest first, for a new user.")
        k: int = Field(10, ge=1, le=100)
        explain: bool = False

    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        from palr.pipeline import PALR

        state["palr"] = run if isinstance(run, PALR) else PALR.load(run, data_dir)
        log.info("serving PALR run %s", state["palr"].run)
        yield
        state.clear()

    app = FastAPI(title="palr", lifespan=lifespan)

    @app.get("/health")
    def health() -> dict[str, Any]:
        p = state["palr"]
        return {"status": "ok", "run": str(p.run), "dataset": p.split.dataset.name,
                "users": p.split.dataset.n_users, "items": p.split.dataset.n_items}

    @app.post("/recommend")
    def recommend(req: RecommendRequest) -> dict[str, Any]:
        if req.user is None and req.history is None:
            raise HTTPException(422, "give 'user' or 'history'")
        try:
            return state["palr"].recommend(user=req.user, history=req.history, k=req.k, explain=req.explain).to_dict()
        except PalrError as e:
            raise HTTPException(404 if "unknown user" in str(e) else 400, str(e)) from None

    return app


def serve(run: "str | Path", host: str = "127.0.0.1", port: int = 8000, data_dir: "str | Path | None" = None) -> None:
    import uvicorn

    uvicorn.run(create_app(run, data_dir), host=host, port=port, log_level="info")
