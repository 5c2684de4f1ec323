"""Item-kNN: cosine similarity between items over training interactions, scored from the user's
most recent items (more recent items weigh more)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import save_file

from palr.retrieval.base import save_params
from palr.runs.safety import load_safetensors, read_json


class ItemKNN:
    name: ClassVar[str] = "itemknn"

    def __init__(self, neighbours: int = 100, recent: int = 20, decay: float = 0.9, shrink: float = 10.0,
                 sequential: bool = True) -> None:
        """neighbours: kept per item; recent: history items used; decay: weight per step back in time;
        shrink: cosine shrinkage; sequential: add similarity of "item followed by item" transitions."""
        self.neighbours, self.recent, self.decay, self.shrink, self.sequential = neighbours, recent, decay, shrink, sequential
        self.sim: sp.csr_matrix | None = None
        self.pop: np.ndarray | None = None

    def params(self) -> dict[str, Any]:
        return {"neighbours": self.neighbours, "recent": self.recent, "decay": self.decay,
                "shrink": self.shrink, "sequential": self.sequential}

    def fit(self, train: Sequence[np.ndarray], n_items: int, *, valid: Any = None, progress: bool = False) -> ItemKNN:
        rows = np.concatenate([np.full(len(s), u) for u, s in enumerate(train)])
        cols = np.concatenate([np.asarray(s) for s in train])
        ui = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(train), n_items))
        co = (ui.T @ ui).tocsr().astype(np.float32)  # (N, N) co-occurrence
        counts = np.asarray(ui.sum(axis=0)).ravel().astype(np.float32)
        if self.sequential:  # item a directly followed by b: a strong sequential signal
            a = np.concatenate([s[:-1] for s in train if len(s) > 1])
            b = np.concatenate([s[1:] for s in train if len(s) > 1])
            trans = sp.csr_matrix((np.ones(len(a), np.float32), (a, b)), shape=(n_items, n_items))
            co = co + 2.0 * trans
        co.setdiag(0)
        co.eliminate_zeros()
        norm = np.sqrt(counts) + 1e-9
        co = sp.diags(1.0 / norm) @ co @ sp.diags(1.0 / norm)
        co = co.tocsr()
        co.data *= (co.data / (co.data + self.shrink / (norm.mean() ** 2))).astype(np.float32)
        self.sim = _keep_top(co.tocsr(), self.neighbours)
        self.pop = counts / max(counts.max(), 1.0)
        return self

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        if self.sim is None or self.pop is None:
            raise RuntimeError("fit() the retriever first")
        n = self.sim.shape[0]
        rows, cols, vals = [], [], []
        for b, h in enumerate(histories):
            h = np.asarray(h)[-self.recent:]
            w = self.decay ** np.arange(len(h))[::-1]
            rows.append(np.full(len(h), b))
            cols.append(h)
            vals.append(w.astype(np.float32))
        q = sp.csr_matrix((np.concatenate(vals) if vals else [], (np.concatenate(rows) if rows else [],
                           np.concatenate(cols) if cols else [])), shape=(len(histories), n), dtype=np.float32)
        scores = np.asarray((q @ self.sim).todense(), dtype=np.float32)
        return scores + 1e-4 * self.pop[None, :]  # popularity only orders items the neighbours don't reach

    def save(self, directory: Path) -> None:
        save_params(directory, self.name, self.params())
        assert self.sim is not None and self.pop is not None
        s = self.sim.tocsr()
        save_file({"data": s.data.astype(np.float32), "indices": s.indices.astype(np.int64),
                   "indptr": s.indptr.astype(np.int64), "pop": self.pop}, str(directory / "weights.safetensors"))

    @classmethod
    def load(cls, directory: Path) -> ItemKNN:
        params = read_json(directory / "retriever.json")["params"]
        model = cls(**params)
        w = load_safetensors(directory / "weights.safetensors")
        n = len(w["pop"])
        model.sim = sp.csr_matrix((w["data"], w["indices"], w["indptr"]), shape=(n, n))
        model.pop = w["pop"]
        return model


def _keep_top(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the k largest entries of each row (ties by column index, deterministic)."""
    indptr, indices, data = [0], [], []
    for r in range(m.shape[0]):
        lo, hi = m.indptr[r], m.indptr[r + 1]
        cols, vals = m.indices[lo:hi], m.data[lo:hi]
        if len(vals) > k:
            order = np.lexsort((cols, -vals))[:k]
            cols, vals = cols[order], vals[order]
        indices.append(cols)
        data.append(vals)
        indptr.append(indptr[-1] + len(cols))
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.array(indptr)), shape=m.shape)
