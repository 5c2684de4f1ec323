"""The LLM plug point: one protocol (generate + score_choices), label helpers, and a registry.

Spec syntax accepted by :func:`load_llm` (the CLI's ``--llm`` flag):

=============================  ==========================================================================
``mini:DIR``                   the embedded default model built by ``palr model create-mini --out DIR``
                               (Hugging Face format; loaded by the ``hf`` backend, never downloaded)
``DIR`` (an existing path)     any local Hugging Face causal LM directory (``hf`` backend)
``hf:ID_OR_PATH``              a local directory or a Hugging Face hub id (a hub id may download: the user
                               named a remote model)
``openai:MODEL@BASE_URL``      an OpenAI-compatible server, e.g. ``openai:llama3@http://localhost:11434/v1``;
                               BASE_URL includes the ``/v1`` prefix like the OpenAI SDK's ``base_url``
                               (``/v1`` is added when the URL has no path). ``openai:MODEL`` alone means
                               ``https://api.openai.com/v1``. The API key comes from ``$OPENAI_API_KEY``
                               or the ``api_key`` option. Client settings may follow the URL as a query:
                               ``...:8000/v1?concurrency=16&batch_size=32`` (also ``timeout``,
                               ``max_retries``, ``top_logprobs``, ``api``); they are not sent to the server.
=============================  ==========================================================================

Options (``dtype``, ``device``, ``adapter``, ``timeout``, ...) go to the backend's constructor.
Nothing touches the network unless the spec names a hub id or a server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from palr.core.errors import PalrError
from palr.llm.hf import HFLLM
from palr.llm.mini import load_mini
from palr.llm.openai import OpenAILLM
from palr.llm.protocol import LLM

log = logging.getLogger(__name__)


__all__ = [
    "BACKENDS",
    "LLM",
    "load_llm",
    "parse_spec",
    "register_backend",
]


# ---------------------------------------------------------------------------- registry
Factory = Callable[..., LLM]


BACKENDS: dict[str, Factory] = {}


def register_backend(name: str, factory: Factory) -> None:
    """Make ``name:REST`` specs resolve to ``factory(REST, **options)``."""
    BACKENDS[name] = factory


def _hf(target: str, **options: Any) -> LLM:

    return HFLLM(target, **options)


def _mini(target: str, **options: Any) -> LLM:

    return load_mini(target, **options)


def _openai(target: str, **options: Any) -> LLM:

    model, _, base = target.partition("@")
    if not model:
        raise PalrError("openai spec needs a model: openai:MODEL@BASE_URL")
    base, _, query = base.partition("?")
    return OpenAILLM(model, base or "https://api.openai.com/v1", **{**_client_settings(query), **options})


_OPENAI_SETTINGS: dict[str, Callable[[str], Any]] = {"concurrency": int, "batch_size": int, "timeout": float,
                                                     "max_retries": int, "top_logprobs": int, "api": str}


def _client_settings(query: str) -> dict[str, Any]:
    """``concurrency=16&batch_size=32`` -> {"concurrency": 16, "batch_size": 32} (the openai client's settings)."""
    from urllib.parse import parse_qsl

    out: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _OPENAI_SETTINGS:
            raise PalrError(f"unknown openai client setting {key!r} in the spec; known: {', '.join(_OPENAI_SETTINGS)}")
        try:
            out[key] = _OPENAI_SETTINGS[key](value)
        except ValueError:
            raise PalrError(f"openai client setting {key}={value!r} is not a valid {_OPENAI_SETTINGS[key].__name__}") from None
    return out


register_backend("hf", _hf)


register_backend("mini", _mini)


register_backend("openai", _openai)


def parse_spec(spec: str) -> tuple[str, str]:
    """``"mini:runs/m"`` -> ("mini", "runs/m"); an existing path -> ("hf", path)."""
    spec = spec.strip()
    if not spec:
        raise PalrError("empty --llm spec; e.g. mini:DIR, hf:ID_OR_PATH, openai:MODEL@URL or a model directory")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in BACKENDS and not Path(spec).exists():
        return prefix, rest
    if Path(spec).expanduser().exists():
        return "hf", spec
    raise PalrError(f"unknown LLM {spec!r}: not an existing path and no known prefix "
                    f"({', '.join(f'{k}:' for k in sorted(BACKENDS))}); e.g. mini:DIR, hf:gpt2, "
                    "openai:MODEL@http://localhost:8000/v1")


def load_llm(spec: str, **options: Any) -> LLM:
    """Build the backend named by ``spec`` (syntax in the module docstring)."""
    backend, target = parse_spec(spec)
    log.info("loading LLM backend %s: %s", backend, target)
    return BACKENDS[backend](target, **options)
