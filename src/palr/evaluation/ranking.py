"""Full ranking over the catalogue with the user's history excluded: ranks, top-k lists, results tables."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from palr.data.dataset import Split, Stage
from palr.evaluation.metrics import DEFAULT_KS, metrics_from_ranks, recall_of_candidates

if TYPE_CHECKING:
    from palr.retrieval.base import Retriever

log = logging.getLogger(__name__)


def pessimistic_ranks(scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each target: 1 + number of other non-excluded items scoring >= the target.

    scores: (B, N) float; targets: (B,) item indices; exclude: (B, N) bool, items not ranked
    (the user's history). NaN scores count as the worst score. A constant-score model gets
    rank = number of non-excluded items, so HR@10 ~ 10/N at best, never 1.
    """
    s = np.where(np.isnan(scores), -np.inf, scores)
    rows = np.arange(len(targets))
    t = s[rows, targets][:, None]  # (B, 1)
    ge = s >= t
    if exclude is not None:
        ge &= ~exclude
    ge[rows, targets] = False
    return ge.sum(axis=1) + 1


def history_mask(histories: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """(B, N) bool, True where the item is in the user's history."""
    mask = np.zeros((len(histories), n_items), dtype=bool)
    for b, h in enumerate(histories):
        mask[b, h] = True
    return mask


def top_k(scores: np.ndarray, histories: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k items per row, history excluded; ties broken by item index (deterministic).

    Order: non-history items before history items, then score descending (NaN = -inf), then item index.
    History items appear (with score -inf) only when a row has fewer than k other items.
    Returns (indices (B, k) int64, scores (B, k) float32), best first.
    """
    s = np.array(scores, dtype=np.float64, copy=True)  # (B, N)
    s[np.isnan(s)] = -np.inf
    excl = history_mask(histories, s.shape[1])  # (B, N)
    s[excl] = -np.inf
    k = min(k, s.shape[1])
    part = np.argpartition(-s, kth=k - 1, axis=1)[:, :k]  # (B, k), unordered
    # order the k: non-history first, then score desc, then item index asc (lexsort uses the last key first)
    ps = np.take_along_axis(s, part, axis=1)
    order = np.lexsort((part, -ps, np.take_along_axis(excl, part, axis=1)), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    # argpartition may cut through a tie at the k-th score (-inf included, where history items sit):
    # redo those rows exactly, sorting only the items that score >= the k-th score
    kth = np.take_along_axis(s, idx[:, -1:], axis=1)  # (B, 1)
    for b in np.flatnonzero((s >= kth).sum(axis=1) > k):
        cand = np.flatnonzero(s[b] >= kth[b, 0])
        idx[b] = cand[np.lexsort((cand, -s[b, cand], excl[b, cand]))[:k]]
    return idx.astype(np.int64), np.take_along_axis(s, idx, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------- full-ranking runs
def score_batches(retriever: Retriever, histories: Sequence[np.ndarray], batch_size: int = 512,
                  progress: bool = False, desc: str = "scoring") -> Iterable[tuple[slice, np.ndarray]]:
    from tqdm.auto import tqdm

    starts = range(0, len(histories), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        sl = slice(start, min(start + batch_size, len(histories)))
        yield sl, retriever.score(list(histories[sl]))


def evaluate_retriever(retriever: Retriever, split: Split, stage: Stage, ks: Sequence[int] = DEFAULT_KS,
                       candidates: int = 0, predictions: int = 0, batch_size: int = 512,
                       progress: bool = False) -> dict[str, Any]:
    """Full ranking of every user's target for ``stage``.

    Returns {"metrics": {...}, "ranks": (U,), "candidates": (U, c) or None, "predictions": (U, p) or None,
    "seconds": float}; with ``candidates`` > 0 the metrics include ``Recall@c``.
    """
    histories = split.histories(stage)
    targets = split.targets(stage)
    ranks = np.empty(len(targets), dtype=np.int64)
    # lists hold no history item, so they can be no longer than the items left beside the longest history
    available = split.n_items - max((len(np.unique(h)) for h in histories), default=0)
    keep = min(max(candidates, predictions), max(available, 0))
    if keep < max(candidates, predictions):
        log.warning("%s: lists cut to %d items: a user's history leaves only %d of %d items",
                    stage, keep, available, split.n_items)
    top = np.empty((len(targets), keep), dtype=np.int64) if keep else None
    top_scores = np.empty((len(targets), keep), dtype=np.float32) if keep else None
    t0 = time.perf_counter()
    for sl, scores in score_batches(retriever, histories, batch_size, progress, desc=f"{stage} ranking"):
        hist = histories[sl]
        ranks[sl] = pessimistic_ranks(scores, targets[sl], history_mask(hist, scores.shape[1]))
        if keep:
            top[sl], top_scores[sl] = top_k(scores, hist, keep)  # type: ignore[index]
    seconds = time.perf_counter() - t0
    metrics = metrics_from_ranks(ranks, ks)
    if candidates:
        metrics[f"Recall@{candidates}"] = recall_of_candidates(top[:, :candidates], targets)  # type: ignore[index]
    return {
        "metrics": metrics,
        "ranks": ranks,
        "candidates": None if top is None else top[:, :candidates] if candidates else None,
        "candidate_scores": None if top_scores is None or not candidates else top_scores[:, :candidates],
        "predictions": None if top is None else top[:, : predictions or keep],
        "seconds": seconds,
    }


def results_table(results: dict[str, dict[str, dict[str, float]]], stage: Stage = "test",
                  columns: Sequence[str] = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")) -> Any:
    """A rich Table of {model: {stage: metrics}}."""
    from rich.table import Table

    extra = sorted({c for r in results.values() for c in r.get(stage, {}) if c.startswith("Recall@")})
    table = Table(title=f"{stage} (full ranking, leave-one-out, pessimistic ties)")
    table.add_column("model", min_width=12)
    for c in [*columns, *extra, "users"]:
        table.add_column(c, justify="right", no_wrap=True, min_width=6)
    for model, by_stage in results.items():
        m = by_stage.get(stage, {})
        cells = [f"{m[c]:.4f}" if isinstance(m.get(c), float) else str(m.get(c, "")) for c in [*columns, *extra]]
        table.add_row(model, *cells, str(m.get("users", "")))
    return table
