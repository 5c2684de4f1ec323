"""Matrix factorisation from `implicit` (ALS and BPR), scored by folding a history in.

The library learns the item factors. A history is scored by computing its user vector from those
item factors: for ALS by solving for it (the least-squares fold-in, the step ALS's ``recalculate_user``
takes), for BPR as the mean of the history's item factors. So any history works, a user scored alone
gets the same row as in a batch, and the training users' own factors are not needed. BPR's item
bias column is added to the score.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import save_file

from palr.core.errors import PalrError
from palr.retrieval.base import save_params
from palr.runs.safety import load_safetensors, read_json

log = logging.getLogger(__name__)


def user_items_matrix(train: Sequence[np.ndarray], n_items: int) -> sp.csr_matrix:
    """(U, N) binary float32 CSR of the training interactions."""
    rows = np.repeat(np.arange(len(train)), [len(s) for s in train])
    cols = np.concatenate([np.asarray(s, dtype=np.int64) for s in train]) if len(train) else np.zeros(0, np.int64)
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(train), n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def fold_in(histories: Sequence[np.ndarray], items: np.ndarray, regularization: float, alpha: float) -> np.ndarray:
    """User vectors (B, f) from item factors ``items`` (N, f): the implicit-ALS least-squares step.

    Each history item has confidence ``alpha`` (others 1 with preference 0); solves
    (Y'Y + Y_h'(alpha - 1)Y_h + reg I) x = alpha * Y_h' 1 per user, in float64.
    """
    y = items.astype(np.float64)
    base = y.T @ y + regularization * np.eye(y.shape[1])  # (f, f)
    out = np.zeros((len(histories), y.shape[1]), dtype=np.float64)
    for b, h in enumerate(histories):
        h = np.unique(np.asarray(h, dtype=np.int64))
        if len(h) == 0:
            continue
        yh = y[h]  # (|h|, f)
        out[b] = np.linalg.solve(base + (alpha - 1.0) * (yh.T @ yh), alpha * yh.sum(axis=0))
    return out.astype(np.float32)


class _ImplicitMF:
    """Shared fit/score/save for the implicit models; subclasses say which model and its parameters."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise PalrError(f"unknown {self.name} parameter(s) {unknown}; known: {sorted(self.defaults)}")
        self.config: dict[str, Any] = {**self.defaults, **params}
        self.items: np.ndarray | None = None  # (N, f) float32
        self.bias: np.ndarray | None = None  # (N,) float32

    def params(self) -> dict[str, Any]:
        return dict(self.config)

    def _model(self) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def _fold_alpha(self) -> float:
        return float(self.config.get("alpha", 1.0))

    def fit(self, train: Sequence[np.ndarray], n_items: int, *, valid: Any = None,
            progress: bool = False) -> _ImplicitMF:
        """Learn item factors from the (U, N) training matrix; ``valid`` is not used."""
        if len(train) == 0 or sum(len(s) for s in train) == 0:
            raise PalrError(f"{self.name}: no training interactions")
        if n_items < 2:
            raise PalrError(f"{self.name} needs at least 2 items, got {n_items}")
        if int(self.config["factors"]) < 1:
            raise PalrError(f"{self.name}: factors must be >= 1, got {self.config['factors']}")
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, "blas"):  # implicit parallelises itself; a BLAS pool on top only contends
            model = self._model()
            model.fit(user_items_matrix(train, n_items), show_progress=progress)
        factors = np.asarray(model.item_factors, dtype=np.float32)
        f = int(self.config["factors"])
        self.items = np.ascontiguousarray(factors[:, :f])
        # BPR keeps an item bias in an extra column (its user factors hold a 1 there)
        self.bias = np.ascontiguousarray(factors[:, f]) if factors.shape[1] > f else np.zeros(n_items, np.float32)
        log.info("%s: item factors %s", self.name, self.items.shape)
        return self

    def user_vectors(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(B, factors) float32 fold-in user vectors."""
        if self.items is None:
            raise RuntimeError("fit() the retriever first")
        return fold_in(histories, self.items, float(self.config["regularization"]), self._fold_alpha())

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(B, n_items) float32: user vector @ item factors (+ item bias)."""
        assert self.items is not None and self.bias is not None
        return (self.user_vectors(histories) @ self.items.T + self.bias[None, :]).astype(np.float32)

    def save(self, directory: Path) -> None:
        if self.items is None or self.bias is None:
            raise RuntimeError("fit() the retriever first")
        directory = Path(directory)
        save_params(directory, self.name, self.params())
        save_file({"items": self.items, "bias": self.bias}, str(directory / "weights.safetensors"))

    @classmethod
    def load(cls, directory: Path) -> _ImplicitMF:
        directory = Path(directory)
        model = cls(**read_json(directory / "retriever.json")["params"])
        w = load_safetensors(directory / "weights.safetensors")
        model.items, model.bias = w["items"], w["bias"]
        return model


class ALS(_ImplicitMF):
    """implicit's AlternatingLeastSquares (conjugate gradient, deterministic per user).

    factors 64; regularization 0.1; alpha 5 (confidence of an interaction); iterations 15; seed 0;
    num_threads 2.
    """

    name: ClassVar[str] = "als"
    defaults: ClassVar[dict[str, Any]] = {"factors": 64, "regularization": 0.1, "alpha": 5.0, "iterations": 15,
                                          "seed": 0, "num_threads": 2}

    def _model(self) -> Any:
        from implicit.cpu.als import AlternatingLeastSquares

        c = self.config
        return AlternatingLeastSquares(factors=int(c["factors"]), regularization=float(c["regularization"]),
                                       alpha=float(c["alpha"]), iterations=int(c["iterations"]),
                                       random_state=int(c["seed"]), num_threads=int(c["num_threads"]))


class BPR(_ImplicitMF):
    """implicit's BayesianPersonalizedRanking, single-threaded (its parallel SGD is not deterministic).

    factors 64; learning_rate 0.01; regularization 0.01; iterations 100; seed 0. A history's user vector
    is the mean of its items' factors (BPR's factors are not fitted for the least-squares fold-in, which
    measured far worse: Beauty test NDCG@10 0.0008 vs 0.012 on the first 3,000 users).
    """

    name: ClassVar[str] = "bpr"
    defaults: ClassVar[dict[str, Any]] = {"factors": 64, "learning_rate": 0.01, "regularization": 0.01,
                                          "iterations": 100, "seed": 0}

    def _model(self) -> Any:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        c = self.config
        return BayesianPersonalizedRanking(factors=int(c["factors"]), learning_rate=float(c["learning_rate"]),
                                           regularization=float(c["regularization"]),
                                           iterations=int(c["iterations"]), random_state=int(c["seed"]),
                                           num_threads=1)

    def user_vectors(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(B, factors) float32: mean item factors of each history (zeros for an empty one)."""
        if self.items is None:
            raise RuntimeError("fit() the retriever first")
        out = np.zeros((len(histories), self.items.shape[1]), dtype=np.float32)
        for b, h in enumerate(histories):
            if len(h):
                out[b] = self.items[np.unique(np.asarray(h, dtype=np.int64))].mean(axis=0)
        return out
