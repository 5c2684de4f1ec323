"""A small OpenAI-compatible server for any palr LLM (``/v1/completions``, ``/v1/chat/completions``).

The app is thin: the model is loaded once in the ``lifespan`` handler and the HTTP layer only translates
requests. ``logprobs`` (completions) and ``logprobs``/``top_logprobs`` (chat) are served when the backend has
``generate_with_logprobs`` (the ``hf``/``mini`` backends). ``echo`` with ``logprobs`` (completions) scores the
prompts themselves, as vLLM does, for clients that need the log-probabilities of given answer labels: the prompts
of one request are scored after their longest common prefix (cut at a whitespace), in one forward pass when each
remainder is one token; the prefix is reported as one token with a null log-probability. ``stream: true`` is
answered with server-sent events as the OpenAI API sends them (``data: {chunk}`` each, then ``data: [DONE]``): the
text is generated whole, then sent in word pieces (echo is not streamed: 400). ``delay_s`` and
``fault="malformed"`` exist for tests of client timeouts and garbage answers. Run it with ``python -m palr.llm.server SPEC --port 8000``.
"""

# No `from __future__ import annotations`: FastAPI must resolve the request models defined in create_app.
import argparse
import asyncio
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from palr.llm.protocol import LLM
from palr.llm.registry import load_llm

log = logging.getLogger(__name__)

__all__ = ["BackgroundServer", "create_app", "free_port"]


def _schemas() -> tuple[type, type]:
    from pydantic import BaseModel

    class CompletionRequest(BaseModel):
        model: str = "palr"
        prompt: str | list[str]
        max_tokens: int = 16
        temperature: float = 0.0
        stop: str | list[str] | None = None
        logprobs: int | None = None
        echo: bool = False
        stream: bool = False

    class ChatRequest(BaseModel):
        model: str = "palr"
        messages: list[dict[str, Any]]
        max_tokens: int | None = 64
        temperature: float = 0.0
        stop: str | list[str] | None = None
        logprobs: bool = False
        top_logprobs: int | None = None
        stream: bool = False

    return CompletionRequest, ChatRequest


def _stops(stop: str | list[str] | None) -> list[str] | None:
    return [stop] if isinstance(stop, str) else stop


def _run(llm: LLM, prompts: list[str], max_tokens: int, temperature: float, stop: list[str] | None,
         top_k: int | None) -> tuple[list[str], list[list[dict[str, Any]]] | None]:
    if top_k is not None and hasattr(llm, "generate_with_logprobs"):
        return llm.generate_with_logprobs(prompts, max_tokens, temperature, stop, top_k=top_k)  # type: ignore
    return llm.generate(prompts, max_new_tokens=max_tokens, temperature=temperature, stop=stop), None


def _echo(llm: LLM, prompts: list[str]) -> list[dict[str, Any]]:
    """OpenAI ``logprobs`` objects for echoed prompts, scored after their common prefix (see the module doc)."""
    import os

    if not hasattr(llm, "token_logprobs"):
        raise ValueError(f"{getattr(llm, 'name', 'this backend')} cannot score prompts (echo)")
    prefix = os.path.commonprefix(prompts)
    cut = len(prefix)
    while cut > 0 and not all(p[cut:cut + 1].isspace() for p in prompts):
        cut = max(prefix.rfind(" ", 0, cut), prefix.rfind("\n", 0, cut), 0)
    scored = llm.token_logprobs(prefix[:cut], [p[cut:] for p in prompts])  # type: ignore[attr-defined]
    out = []
    for steps in scored:
        tokens, lps, offs, pos = [prefix[:cut]], [None], [0], cut
        for tok, lp in steps:
            tokens.append(tok)
            lps.append(lp)
            offs.append(pos)
            pos += len(tok)
        out.append({"tokens": tokens, "token_logprobs": lps, "text_offset": offs,
                    "top_logprobs": [None] * len(tokens)})
    return out


def _pieces(text: str) -> list[str]:
    """``text`` in the pieces a stream sends: words with the whitespace before them (joined, they give ``text``)."""
    return re.findall(r"\s*\S+|\s+$", text) or [""]


def _sse(chunks: list[dict[str, Any]]) -> Any:
    """Server-sent events as the OpenAI API streams them: ``data: {json}`` per chunk, then ``data: [DONE]``."""
    from fastapi.responses import StreamingResponse

    async def events() -> Any:
        for c in chunks:
            yield f"data: {json.dumps(c)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


def create_app(llm: str | LLM | Callable[[], LLM], *, model_name: str = "palr", delay_s: float = 0.0,
               fault: str | None = None, **llm_options: Any) -> Any:
    """A FastAPI app serving ``llm`` (a spec for :func:`load_llm`, an LLM, or a factory), loaded at startup."""
    from fastapi import FastAPI, HTTPException

    CompletionRequest, ChatRequest = _schemas()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if isinstance(llm, str):
            app.state.llm = load_llm(llm, **llm_options)
        elif callable(llm) and not hasattr(llm, "generate"):
            app.state.llm = llm()
        else:
            app.state.llm = llm
        app.state.lock = asyncio.Lock()  # one generation at a time: torch models are not re-entrant
        log.info("serving %s as %r", getattr(app.state.llm, "name", "llm"), model_name)
        yield

    app = FastAPI(title="palr LLM server", lifespan=lifespan)

    async def _call(*args: Any) -> Any:
        if delay_s:
            await asyncio.sleep(delay_s)
        async with app.state.lock:
            return await asyncio.to_thread(_run, app.state.llm, *args)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "palr"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:  # type: ignore[valid-type]
        if fault == "malformed":
            return {"choices": [{"unexpected": True}]}
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if req.echo:
            if req.stream:
                raise HTTPException(400, "echo (prompt scoring) is not streamed: send it with stream=false")
            if not req.logprobs:
                raise HTTPException(400, "echo is served with logprobs only (prompt scoring)")
            try:
                if delay_s:
                    await asyncio.sleep(delay_s)
                async with app.state.lock:
                    scored = await asyncio.to_thread(_echo, app.state.llm, prompts)
            except ValueError as e:
                raise HTTPException(400, str(e)) from None
            return {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()),
                    "model": model_name, "choices": [{"index": k, "text": p, "logprobs": lp, "finish_reason": "length"}
                                                     for k, (p, lp) in enumerate(zip(prompts, scored))]}
        texts, details = await _call(prompts, req.max_tokens, req.temperature, _stops(req.stop), req.logprobs)
        choices = []
        for k, text in enumerate(texts):
            lp = None
            if details is not None:
                steps = details[k]
                lp = {"tokens": [s["token"] for s in steps], "token_logprobs": [s["logprob"] for s in steps],
                      "top_logprobs": [dict(s["top"]) for s in steps]}
            choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": "stop"})
        head = {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if req.stream:  # generated whole, sent as it would be streamed: word pieces, then the finish reason
            chunks = []
            for c in choices:
                pieces = [c["text"]] if c["logprobs"] is not None else _pieces(c["text"])
                chunks += [head | {"choices": [{"index": c["index"], "text": t, "logprobs": c["logprobs"] if not j
                                                 else None, "finish_reason": None}]} for j, t in enumerate(pieces)]
                chunks.append(head | {"choices": [{"index": c["index"], "text": "", "logprobs": None,
                                                   "finish_reason": c["finish_reason"]}]})
            return _sse(chunks)
        return head | {"choices": choices}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Any:  # type: ignore[valid-type]
        if fault == "malformed":
            return {"choices": [{"message": {"content": {"not": "text"}}}]}
        prompt = "\n".join(str(m.get("content", "")) for m in req.messages)
        top_k = (req.top_logprobs or 0) if req.logprobs else None
        texts, details = await _call([prompt], req.max_tokens or 64, req.temperature, _stops(req.stop), top_k)
        lp = None
        if details is not None:
            lp = {"content": [{"token": s["token"], "logprob": s["logprob"],
                               "top_logprobs": [{"token": t, "logprob": v} for t, v in s["top"]]}
                              for s in details[0]]}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": model_name}
        if req.stream:
            chunk = head | {"object": "chat.completion.chunk"}
            pieces = [texts[0]] if lp is not None else _pieces(texts[0])
            chunks = [chunk | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}]
            chunks += [chunk | {"choices": [{"index": 0, "delta": {"content": t}, "logprobs": lp if not j else None,
                                             "finish_reason": None}]} for j, t in enumerate(pieces)]
            chunks.append(chunk | {"choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
            return _sse(chunks)
        return head | {"object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                                    "logprobs": lp, "finish_reason": "stop"}]}

    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """Run an app with uvicorn in a daemon thread: ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 30.0) -> None:
        import uvicorn

        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.startup_timeout = startup_timeout

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the LLM server did not start")
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    """``python -m palr.llm.server SPEC [--host H] [--port P] [--name NAME]``."""
    import uvicorn

    ap = argparse.ArgumentParser(description="Serve a palr LLM with an OpenAI-compatible API.")
    ap.add_argument("spec", help="mini:DIR, hf:ID_OR_PATH, or a model directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--name", default="palr", help="model name the API reports")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    uvicorn.run(create_app(args.spec, model_name=args.name), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
