"""The ``openai`` backend: any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp, palr's own server).

Requests go through ``httpx`` with a timeout, retries with exponential back-off (timeouts, connection errors,
429/5xx and malformed answers). At most ``concurrency`` requests are in flight per client, whatever the number of
threads calling it (a bounded pool: the service's request threads share it), and on the completions API up to
``batch_size`` prompts go in one request (``"prompt": [...]``, as vLLM, OpenAI and palr's server accept); a server
that refuses a list of prompts gets one prompt per request from then on. After the last retry a
:class:`PalrError` says what went wrong. Nothing is sent until a method is called.

``score_choices`` asks for the log-probabilities of the label tokens themselves (``"echo"``): one completions
request per prompt holding ``prompt + label`` for every label, with ``echo=true`` and ``logprobs``; the label's
tokens (found by ``text_offset``) are summed, so multi-token labels are scored exactly and any number of labels
works. vLLM and palr's own server answer this; a server that refuses it (or the chat API) falls back to the first
answer token's ``top_logprobs`` (labels missing from the top-k get ``-inf``), and a server with no
log-probabilities at all to a short generated answer whose first label gets 0 and the others ``-inf``.
``self.last_scoring`` says which ("echo", "top_logprobs", "parsed").

Failures are counted (``self.failures``: requests that failed after all retries). A server that cannot be reached
(connection refused, timeouts) or keeps failing (HTTP 5xx, 429, 408 after the retries) raises :class:`palr.core.errors.LLMUnavailable`; after one such failure the next requests
get a single attempt until one succeeds, so a dead server is noticed in seconds, not minutes.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import numpy as np

from palr.core.errors import LLMRequestFailed, LLMUnavailable, PalrError

log = logging.getLogger(__name__)

__all__ = ["OpenAILLM", "normalize_base_url"]

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class _Malformed(Exception):
    """The server answered 200 with a body that is not the protocol."""


class _Refused(PalrError):
    """The server answered 4xx: the request itself is not accepted (retrying will not help)."""


def normalize_base_url(url: str) -> str:
    """Add ``http://`` when the scheme is missing and ``/v1`` when there is no path; drop a trailing slash."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parsed = urlparse(url)
    if parsed.path in ("", "/"):
        url = url.rstrip("/") + "/v1"
    return url.rstrip("/")


class OpenAILLM:
    """An OpenAI-compatible endpoint behind the :class:`palr.llm.protocol.LLM` protocol.

    Args:
        model: the server's model name.
        base_url: e.g. ``http://localhost:8000/v1`` (see :func:`normalize_base_url`).
        api_key: defaults to ``$OPENAI_API_KEY``; no Authorization header when neither is set.
        api: "completions" (``/completions``, raw prompts) or "chat" (``/chat/completions``, one user message).
        timeout: seconds per request; max_retries: extra attempts; backoff: first wait, doubled per retry.
        concurrency: requests in flight at once (over all threads); top_logprobs: k asked for when scoring.
        batch_size: prompts per completions request for generation and top-logprob scoring (1: one prompt per
            request; chat requests hold one prompt; echo scoring sends one prompt's labels per request).
    """

    def __init__(self, model: str, base_url: str, *, api_key: str | None = None, api: str = "completions",
                 timeout: float = 180.0, max_retries: int = 3, backoff: float = 0.5, concurrency: int = 4,
                 top_logprobs: int = 20, batch_size: int = 16) -> None:
        if api not in ("completions", "chat"):
            raise PalrError(f"api must be 'completions' or 'chat', not {api!r}")
        self.model = model
        self.base_url = normalize_base_url(base_url)
        self.api = api
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff = float(backoff)
        self.concurrency = max(1, int(concurrency))
        self.batch_size = max(1, int(batch_size))
        self._slots = threading.BoundedSemaphore(self.concurrency)  # requests in flight, over all threads
        self._batching: bool | None = None  # does the server take a list of prompts? (None: not tried yet)
        self.top_logprobs = int(top_logprobs)
        self.name = f"openai:{model}@{self.base_url}"
        self.last_scoring = "none"
        self.failures = 0  # requests that failed after all retries
        self.consecutive_unreachable = 0
        self._echo: bool | None = None  # does the server answer echo scoring? (None: not tried yet)
        self._client: Any = None

    # ------------------------------------------------------------------------ transport
    def _http(self) -> Any:
        if self._client is None:
            import httpx

            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=headers,
                                        limits=httpx.Limits(max_connections=self.concurrency))
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _post(self, path: str, body: dict[str, Any], parse: Any) -> Any:
        """POST with retries; ``parse(json)`` may raise _Malformed/KeyError/TypeError to trigger a retry."""
        import httpx

        last = "no attempt"
        unreachable = False
        attempts = 1 if self.consecutive_unreachable else self.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with self._slots:
                    resp = self._http().post(path, json=body)
            except httpx.TimeoutException:
                last, unreachable = f"timed out after {self.timeout:g} s", True
            except httpx.TransportError as e:
                last, unreachable = f"connection failed ({type(e).__name__}: {e})", True
            else:
                unreachable = False
                if resp.status_code in _RETRY_STATUS:
                    last, unreachable = f"HTTP {resp.status_code}: {resp.text[:200]}", True  # a failing server
                elif resp.status_code >= 400:
                    self.consecutive_unreachable = 0
                    raise _Refused(f"{self.base_url}{path} refused the request: HTTP {resp.status_code}: "
                                   f"{resp.text[:300]}")
                else:
                    try:
                        out = parse(resp.json())
                        self.consecutive_unreachable = 0
                        return out
                    except (ValueError, KeyError, IndexError, TypeError, _Malformed) as e:
                        last = f"malformed answer ({type(e).__name__}: {e}): {resp.text[:200]!r}"
            log.warning("%s%s attempt %d/%d: %s", self.base_url, path, attempt + 1, attempts, last)
        self.failures += 1
        if unreachable:
            self.consecutive_unreachable += 1
            raise LLMUnavailable(f"LLM server {self.base_url} unreachable or failing ({attempts} attempts): "
                                 f"{' '.join(last.split())[:300]}")
        self.consecutive_unreachable = 0
        raise LLMRequestFailed(f"LLM server {self.base_url}{path} failed after {attempts} attempts: {last}")

    def _map(self, fn: Any, items: list[Any]) -> list[Any]:
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    # ------------------------------------------------------------------------ requests
    def _request(self, prompt: str, max_tokens: int, temperature: float, stop: list[str] | None,
                 logprobs: int | None, extra: dict[str, Any]) -> tuple[str, list[dict[str, float]] | None]:
        """(text, top-logprob dicts per token or None)."""
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature}
        if stop:
            body["stop"] = stop
        if self.api == "completions":
            body["prompt"] = prompt
            if logprobs:
                body["logprobs"] = logprobs
            body.update(extra)
            return self._post("/completions", body, _parse_completion)
        body["messages"] = [{"role": "user", "content": prompt}]
        if logprobs:
            body.update(logprobs=True, top_logprobs=logprobs)
        body.update(extra)
        return self._post("/chat/completions", body, _parse_chat)

    def _request_many(self, prompts: list[str], max_tokens: int, temperature: float, stop: list[str] | None,
                      logprobs: int | None, extra: dict[str, Any]) -> list[tuple[str, list[dict[str, float]] | None]]:
        """``_request`` for every prompt: ``batch_size`` prompts per completions request where the server takes a
        list, ``concurrency`` requests in flight; answers in prompt order."""
        def one(prompt: str) -> tuple[str, list[dict[str, float]] | None]:
            return self._request(prompt, max_tokens, temperature, stop, logprobs, extra)

        if self.api != "completions" or self.batch_size == 1 or len(prompts) <= 1 or self._batching is False:
            return self._map(one, prompts)
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature}
        if stop:
            body["stop"] = stop
        if logprobs:
            body["logprobs"] = logprobs
        body.update(extra)
        groups = [prompts[s:s + self.batch_size] for s in range(0, len(prompts), self.batch_size)]

        def batch(group: list[str]) -> list[tuple[str, list[dict[str, float]] | None]]:
            return self._post("/completions", {**body, "prompt": group}, lambda d: _parse_completions(d, len(group)))

        if self._batching is None:  # the first list decides whether this server takes lists
            try:
                first = batch(groups[0])
            except LLMUnavailable:
                raise
            except PalrError as e:  # refused (4xx) or answered something else than one choice per prompt
                log.warning("%s takes no list of prompts (%s): one prompt per request", self.base_url, e)
                self._batching = False
                return self._map(one, prompts)
            self._batching = True
            return first + [a for g in self._map(batch, groups[1:]) for a in g]
        return [a for g in self._map(batch, groups) for a in g]

    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 stop: list[str] | None = None, **kw: Any) -> list[str]:
        """Up to ``batch_size`` prompts a request, ``concurrency`` requests in flight; extra keywords are sent in the
        request body."""
        return [text for text, _ in self._request_many(prompts, max_new_tokens, temperature, stop, None, kw)]

    def _echo_scores(self, prompt: str, labels: list[str]) -> np.ndarray:
        """(L,) log p(label | prompt): the label tokens' log-probabilities from one echo request."""
        body = {"model": self.model, "prompt": [prompt + label for label in labels], "max_tokens": 1,
                "temperature": 0.0, "echo": True, "logprobs": 1}
        choices = self._post("/completions", body, _parse_echo)
        if len(choices) != len(labels):
            raise _Refused(f"echo scoring: {len(choices)} answers for {len(labels)} prompts")
        start = len(prompt)
        out = np.empty(len(labels), dtype=np.float32)
        for j, (label, (tokens, logprobs, offsets)) in enumerate(zip(labels, choices)):
            end = start + len(label)
            total, n = 0.0, 0
            for tok, lp, off in zip(tokens, logprobs, offsets):
                if off < end and off + max(len(tok), 1) > start:  # a token of the label (or straddling into it)
                    if lp is None:
                        raise _Refused("echo scoring: no log-probability for a label token")
                    total, n = total + lp, n + 1
            if n == 0:
                raise _Refused(f"echo scoring: no token of label {label!r} in the answer")
            out[j] = total
        return out

    def score_choices(self, prompts: list[str], labels: list[str]) -> np.ndarray:
        """(B, L) log p(label | prompt) (see the module docstring for the three ways it is obtained)."""
        out = np.full((len(prompts), len(labels)), -np.inf, dtype=np.float32)
        if not labels:
            return out
        if self.api == "completions" and self._echo is not False:
            try:  # one request per prompt (its labels in one list), ``concurrency`` in flight
                rows = self._map(lambda p: self._echo_scores(p, labels), prompts)
            except _Refused as e:
                log.warning("%s does not score label tokens by echo (%s); using top_logprobs", self.base_url, e)
                self._echo = False
            else:
                self._echo = True
                self.last_scoring = "echo"
                return np.stack(rows) if rows else out
        keys = [label.strip() for label in labels]
        answers = self._request_many(prompts, 1, 0.0, None, self.top_logprobs, {})
        modes = set()
        need_parse = []
        for b, (_, tops) in enumerate(answers):
            if not tops:
                need_parse.append(b)
                continue
            modes.add("logprobs")
            top = tops[0]
            for j, label in enumerate(labels):
                if label in top:  # exact token text first; " A" and "A" may both be tokens
                    out[b, j] = top[label]
                else:
                    out[b, j] = max((lp for tok, lp in top.items() if tok.strip() == keys[j]), default=-np.inf)
        if need_parse:
            modes.add("parsed")
            longest = max(len(k) for k in keys)
            texts = self.generate([prompts[b] for b in need_parse], max_new_tokens=max(4, longest + 2))
            for b, text in zip(need_parse, texts):
                j = _first_label(text, keys)
                if j is not None:
                    out[b, j] = 0.0
        self.last_scoring = "mixed" if len(modes) > 1 else (modes.pop() if modes else "none")
        self.last_scoring = self.last_scoring.replace("logprobs", "top_logprobs")
        return out


def _first_label(text: str, keys: list[str]) -> int | None:
    """Index of the label that the answer text names first (whole-word match, longest label wins a tie)."""
    best: tuple[int, int, int] | None = None
    for j, k in enumerate(keys):
        if not k:
            continue
        m = re.search(r"(?<![\w<])" + re.escape(k) + r"(?![\w>])", text)
        if m and (best is None or (m.start(), -len(k)) < (best[0], best[1])):
            best = (m.start(), -len(k), j)
    return None if best is None else best[2]


def _parse_echo(data: dict[str, Any]) -> list[tuple[list[str], list[float | None], list[int]]]:
    """Per choice (in prompt order): tokens, their log-probabilities (None where the server gave none), offsets."""
    out = []
    for choice in sorted(data["choices"], key=lambda c: c.get("index", 0)):
        lp = choice.get("logprobs")
        if not isinstance(lp, dict) or not lp.get("tokens") or lp.get("token_logprobs") is None:
            raise _Refused("echo scoring: the answer has no token log-probabilities")
        tokens = [str(t) for t in lp["tokens"]]
        logprobs = [None if v is None else float(v) for v in lp["token_logprobs"]]
        offsets = lp.get("text_offset")
        if offsets is None:  # rebuild from the token texts
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
        out.append((tokens, logprobs, [int(o) for o in offsets]))
    return out


def _parse_completions(data: dict[str, Any], n: int) -> list[tuple[str, list[dict[str, float]] | None]]:
    """The answers to a list of ``n`` prompts, in prompt order (by each choice's ``index``)."""
    choices = sorted(data["choices"], key=lambda c: int(c.get("index", 0)))
    if len(choices) != n or [int(c.get("index", k)) for k, c in enumerate(choices)] != list(range(n)):
        raise _Malformed(f"{len(choices)} choices for {n} prompts")
    return [_parse_completion({"choices": [c]}) for c in choices]


def _parse_completion(data: dict[str, Any]) -> tuple[str, list[dict[str, float]] | None]:
    choice = data["choices"][0]
    text = choice["text"]
    if not isinstance(text, str):
        raise _Malformed("choices[0].text is not a string")
    lp = choice.get("logprobs") or {}
    tops = lp.get("top_logprobs") if isinstance(lp, dict) else None
    if tops is not None and not all(isinstance(t, dict) for t in tops):
        raise _Malformed("logprobs.top_logprobs is not a list of objects")
    return text, ([{str(k): float(v) for k, v in t.items()} for t in tops] if tops else None)


def _parse_chat(data: dict[str, Any]) -> tuple[str, list[dict[str, float]] | None]:
    choice = data["choices"][0]
    text = choice["message"]["content"]
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise _Malformed("choices[0].message.content is not a string")
    content = (choice.get("logprobs") or {}).get("content")
    if not content:
        return text, None
    return text, [{str(t["token"]): float(t["logprob"]) for t in step.get("top_logprobs") or [step]}
                  for step in content]
