"""The retriever contract and its registry.

A retriever is fitted on training sequences and scores every item for a batch of histories.
Top-k selection and history exclusion live in :func:`palr.core.topk.top_k`, the same for every model.
"""

from __future__ import annotations

import importlib
import inspect
import json
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from palr.core.console import progress_enabled
from palr.core.errors import ConfigError, PalrError, RunError
from palr.core.options import convert, unknown_key_error
from palr.core.topk import top_k
from palr.runs.safety import read_json


@runtime_checkable
class Retriever(Protocol):
    """fit(train) once; score(histories) -> (B, n_items) float32, higher is better.

    ``score`` must give the same row for a history whether it is scored alone or in a batch.
    History items are excluded by the caller (``recommend``/evaluation), not by ``score``.
    """

    name: ClassVar[str]

    def fit(self, train: Sequence[np.ndarray], n_items: int, *, valid: tuple[Sequence[np.ndarray], np.ndarray]
            | None = None, progress: bool = False) -> Retriever: ...

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray: ...

    def params(self) -> dict[str, Any]: ...

    def save(self, directory: Path) -> None: ...

    @classmethod
    def load(cls, directory: Path) -> Retriever: ...


def recommend(retriever: Retriever, histories: Sequence[np.ndarray], k: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item indices and scores per history, history items excluded, best first."""
    return top_k(retriever.score(list(histories)), histories, k)


# name -> "module:Class"; imported lazily so optional extras stay optional
REGISTRY: dict[str, str] = {
    "popularity": "palr.retrieval.popularity:Popularity",
    "itemknn": "palr.retrieval.itemknn:ItemKNN",
    "sasrec": "palr.retrieval.sasrec:SASRec",
    "als": "palr.retrieval.mf:ALS",
    "bpr": "palr.retrieval.mf:BPR",
    "text": "palr.retrieval.text:TextRetriever",
}


def retriever_class(name: str) -> Callable[..., Retriever]:
    if name not in REGISTRY:
        raise KeyError(f"unknown retriever {name!r}; known: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def param_types(name: str) -> dict[str, Any]:
    """A retriever's hyper-parameters and their types: from its ``defaults`` (and ``param_types`` for the
    ones whose default is None, i.e. chosen from the data) or from its ``__init__`` signature."""
    cls = retriever_class(name)
    defaults = getattr(cls, "defaults", None)
    if defaults is not None:
        declared = getattr(cls, "param_types", {})
        return {k: declared.get(k, type(v) if v is not None else Any) for k, v in defaults.items()}
    hints = typing.get_type_hints(cls.__init__)
    return {p: hints.get(p, Any) for p in inspect.signature(cls.__init__).parameters if p != "self"}


def check_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` checked against the retriever's typed hyper-parameters (ConfigError naming the valid keys)."""

    try:
        types_ = param_types(name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in types_:
            raise unknown_key_error(key, list(types_), f"--param {key}={value} ({name})")
        t = types_[key]
        out[key] = value if t is Any else convert(t | None if value is None else t, value, f"--param {key} ({name})")
    return out


def check_settings(cfg: Any) -> Any:
    """A command's settings with ``--param`` checked against its retrievers' typed hyper-parameters (values
    converted in place); unknown retriever names and keys are one line naming the valid ones. Settings live in
    :mod:`palr.core.settings`, which knows no retriever: the command line calls this after building them."""
    retrievers, params = getattr(cfg, "retriever", None), getattr(cfg, "params", None)
    if not retrievers or params is None:
        return cfg
    if isinstance(retrievers, str):
        cfg.params = check_params(retrievers, params)
        return cfg
    for r in retrievers:
        check_params(r, {})  # an unknown retriever name is an error here
    for key, value in params.items():
        takers = [r for r in retrievers if key in param_types(r)]
        if not takers:
            valid = sorted({k for r in retrievers for k in param_types(r)})
            raise unknown_key_error(key, valid, f"--param {key}={value} ({', '.join(retrievers)})")
        for r in takers:
            params[key] = check_params(r, {key: value})[key]
    return cfg


def make_retriever(name: str, **params: Any) -> Retriever:
    """Build a retriever by registry name with its hyper-parameters (unknown ones are an error)."""
    return retriever_class(name)(**params)


def save_params(directory: Path, name: str, params: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "retriever.json").write_text(json.dumps({"name": name, "params": params}, indent=2, sort_keys=True))


def load_retriever(directory: Path) -> Retriever:
    """Load a saved retriever from a directory written by its ``save``."""
    meta = read_json(Path(directory) / "retriever.json")
    try:
        cls = retriever_class(meta["name"])
    except (KeyError, PalrError) as e:
        raise RunError(f"{Path(directory) / 'retriever.json'}: damaged run file ({e})") from None
    try:
        return cls.load(directory)  # type: ignore[attr-defined]
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:  # a file that parsed but is wrong
        raise RunError(f"{directory}: damaged retriever files ({type(e).__name__}: {str(e)[:200]})") from None


# ---------------------------------------------------------------------------- full-ranking runs
def score_batches(retriever: Retriever, histories: Sequence[np.ndarray], batch_size: int = 512,
                  progress: bool = False, desc: str = "scoring") -> Iterable[tuple[slice, np.ndarray]]:
    from tqdm.auto import tqdm


    starts = range(0, len(histories), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress_enabled(progress), leave=False):
        sl = slice(start, min(start + batch_size, len(histories)))
        yield sl, retriever.score(list(histories[sl]))
