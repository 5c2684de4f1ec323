"""Pure metric functions on 1-based ranks (one relevant item per user): per user and averaged.

A rank is the target's 1-based position in the model's full ranking (history excluded, ties broken as
:mod:`palr.core.topk` says). Every average below is the mean of :func:`per_user_metrics`, so the
figures in results.json and the per-user files are one definition.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

DEFAULT_KS = (5, 10, 20)


def _ranks(ranks: np.ndarray) -> np.ndarray:
    return np.asarray(ranks, dtype=np.float64)


def per_user_hit(ranks: np.ndarray, k: int) -> np.ndarray:
    """(U,) 1.0 where rank <= k, else 0.0."""
    return (_ranks(ranks) <= k).astype(np.float64)


def per_user_ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
    """(U,) 1 / log2(rank + 1) where rank <= k, else 0 (one relevant item, so IDCG = 1)."""
    r = _ranks(ranks)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)


def per_user_mrr(ranks: np.ndarray, k: int) -> np.ndarray:
    """(U,) 1 / rank where rank <= k, else 0."""
    r = _ranks(ranks)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r <= k, 1.0 / r, 0.0)


def per_user_metrics(ranks: np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """{"HR@k", "NDCG@k", "MRR@k": (U,) float64} for each k, from 1-based ranks (a miss: any rank > k)."""
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"HR@{k}"] = per_user_hit(ranks, k)
        out[f"NDCG@{k}"] = per_user_ndcg(ranks, k)
        out[f"MRR@{k}"] = per_user_mrr(ranks, k)
    return out


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else 0.0


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """HR@k: share of users whose target has rank <= k."""
    return _mean(per_user_hit(ranks, k))


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item: mean of 1 / log2(rank + 1) if rank <= k, else 0."""
    return _mean(per_user_ndcg(ranks, k))


def mrr(ranks: np.ndarray, k: int) -> float:
    """MRR@k: mean of 1 / rank if rank <= k, else 0."""
    return _mean(per_user_mrr(ranks, k))


def metrics_from_ranks(ranks: np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """The means of :func:`per_user_metrics`, plus ``users``."""
    out: dict[str, float] = {name: _mean(v) for name, v in per_user_metrics(ranks, ks).items()}
    out["users"] = len(ranks)
    return out


def recall_of_candidates(candidates: np.ndarray, targets: np.ndarray) -> float:
    """Share of users whose target is in their candidate list (recall@len)."""
    if not len(targets):
        return 0.0
    return float(np.mean((np.asarray(candidates) == np.asarray(targets)[:, None]).any(axis=1)))
