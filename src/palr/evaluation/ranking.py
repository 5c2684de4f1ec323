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


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64) + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def tie_keys(users: np.ndarray, items: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint64 pseudo-random key of each (user, item) pair (broadcast), a hash of (seed, user, item).

    Among items with equal scores, the smaller key ranks first: a seeded random order, independent per user,
    never the item id, and the same whatever the batch a user is scored in.
    """
    u = _splitmix64(_splitmix64(np.uint64(seed % 2**64)) ^ np.asarray(users, dtype=np.uint64))
    return _splitmix64(u ^ np.asarray(items, dtype=np.uint64))


def ranks_of_targets(scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray | None = None, *,
                     users: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """1-based rank of each target in the order :func:`top_k` writes: score descending, ties in the seeded
    random order of :func:`tie_keys`, excluded items (the history) not ranked.

    scores: (B, N) float (NaN = -inf); targets: (B,) item indices; exclude: (B, N) bool; users: (B,) user
    indices for the tie keys (default 0..B-1). rank = 1 + #{scoring above} + #{tied and drawn before}; a
    constant-score model thus gets a uniformly random rank: HR@10 ~ 10/N, never 1.
    """
    s = np.where(np.isnan(scores), -np.inf, scores)
    rows = np.arange(len(targets))
    users = rows if users is None else np.asarray(users)
    t = s[rows, targets][:, None]  # (B, 1)
    above = s > t
    tied = s == t
    if exclude is not None:
        above &= ~exclude
        tied &= ~exclude
    tied[rows, targets] = False
    r, c = np.nonzero(tied)  # the few (user, item) pairs that tie with the target
    first = tie_keys(users[r], c, seed) < tie_keys(users[r], targets[r], seed)
    return above.sum(axis=1) + np.bincount(r[first], minlength=len(targets)) + 1


def pessimistic_ranks(scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """1-based worst-case rank: 1 + number of other non-excluded items scoring >= the target (NaN = -inf).

    A lower bound on any tie rule's metrics (a constant-score model gets rank = number of non-excluded items);
    the reported metrics use :func:`ranks_of_targets`, whose order is the one written to predictions.
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


def top_k(scores: np.ndarray, histories: Sequence[np.ndarray], k: int, *, users: np.ndarray | None = None,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Best k items per row, history excluded; ties in the seeded random order of :func:`tie_keys`.

    Order: non-history items before history items, then score descending (NaN = -inf), then the tie key of
    (users[b], item) (users default to 0..B-1). History items appear (with score -inf) only when a row has
    fewer than k other items. The position of a target in this order is :func:`ranks_of_targets`.
    Returns (indices (B, k) int64, scores (B, k) float32), best first.
    """
    s = np.array(scores, dtype=np.float64, copy=True)  # (B, N)
    s[np.isnan(s)] = -np.inf
    users = np.arange(len(s)) if users is None else np.asarray(users)
    excl = history_mask(histories, s.shape[1])  # (B, N)
    s[excl] = -np.inf
    k = min(k, s.shape[1])
    part = np.argpartition(-s, kth=k - 1, axis=1)[:, :k]  # (B, k), unordered
    # order the k: non-history first, then score desc, then tie key asc (lexsort uses the last key first)
    ps = np.take_along_axis(s, part, axis=1)
    keys = tie_keys(users[:, None], part, seed)
    order = np.lexsort((keys, -ps, np.take_along_axis(excl, part, axis=1)), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    # argpartition may cut through a tie at the k-th score (-inf included, where history items sit):
    # redo those rows exactly, sorting only the items that score >= the k-th score
    kth = np.take_along_axis(s, idx[:, -1:], axis=1)  # (B, 1)
    for b in np.flatnonzero((s >= kth).sum(axis=1) > k):
        cand = np.flatnonzero(s[b] >= kth[b, 0])
        idx[b] = cand[np.lexsort((tie_keys(users[b], cand, seed), -s[b, cand], excl[b, cand]))[:k]]
    return idx.astype(np.int64), np.take_along_axis(s, idx, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------- full-ranking runs
def score_batches(retriever: Retriever, histories: Sequence[np.ndarray], batch_size: int = 512,
                  progress: bool = False, desc: str = "scoring") -> Iterable[tuple[slice, np.ndarray]]:
    from tqdm.auto import tqdm

    from palr.console import progress_enabled

    starts = range(0, len(histories), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress_enabled(progress), leave=False):
        sl = slice(start, min(start + batch_size, len(histories)))
        yield sl, retriever.score(list(histories[sl]))


def evaluate_retriever(retriever: Retriever, split: Split, stage: Stage, ks: Sequence[int] = DEFAULT_KS,
                       candidates: int = 0, predictions: int = 0, batch_size: int = 512,
                       progress: bool = False, seed: int = 0, users: np.ndarray | None = None,
                       sharded: bool = False) -> dict[str, Any] | None:
    """Full ranking of every user's target for ``stage`` (of ``users`` only, when given); ties in the random order
    of ``seed`` (:func:`tie_keys`), so a target's rank is its position in the written lists.

    Returns {"metrics": {...}, "ranks": (U,), "candidates": (U, c) or None, "predictions": (U, p) or None,
    "seconds": float}; with ``candidates`` > 0 the metrics include ``Recall@c``.
    ``sharded``: under a launcher with several processes each ranks its block of the users
    (:func:`palr.distributed.shard`, whole batches) and the main process gets the gathered result, identical to one
    process's; the other processes get None.
    """
    from palr import distributed

    histories = split.histories(stage)
    targets = split.targets(stage)
    sel = np.arange(len(targets)) if users is None else np.asarray(users, dtype=np.int64)
    # lists hold no history item, so they can be no longer than the items left beside the longest history
    available = split.n_items - max((len(np.unique(h)) for h in histories), default=0)
    keep = min(max(candidates, predictions), max(available, 0))
    if keep < max(candidates, predictions):
        log.warning("%s: lists cut to %d items: a user's history leaves only %d of %d items",
                    stage, keep, available, split.n_items)
    mine = sel[distributed.shard(len(sel), batch_size)] if sharded else sel
    t0 = time.perf_counter()
    part = _rank_users(retriever, [histories[u] for u in mine], targets[mine], mine, keep, batch_size, progress,
                       f"{stage} ranking", seed)
    if sharded:
        part = distributed.gather_arrays(part)
        if part is None:
            return None
    seconds = time.perf_counter() - t0
    ranks, top, top_scores = part["ranks"], part["top"], part["top_scores"]
    metrics = metrics_from_ranks(ranks, ks)
    if candidates:
        metrics[f"Recall@{candidates}"] = recall_of_candidates(top[:, :candidates], targets[sel])  # type: ignore[index]
    return {
        "metrics": metrics,
        "ranks": ranks,
        "candidates": None if top is None else top[:, :candidates] if candidates else None,
        "candidate_scores": None if top_scores is None or not candidates else top_scores[:, :candidates],
        "predictions": None if top is None else top[:, : predictions or keep],
        "seconds": seconds,
    }


def _rank_users(retriever: Retriever, histories: Sequence[np.ndarray], targets: np.ndarray, users: np.ndarray,
                keep: int, batch_size: int, progress: bool, desc: str, seed: int) -> dict[str, Any]:
    """Ranks of the targets and the best ``keep`` items (history excluded) of the given users (their indices
    ``users`` key the ties, so a user's result does not depend on the batch or the process it is scored in)."""
    ranks = np.empty(len(targets), dtype=np.int64)
    top = np.empty((len(targets), keep), dtype=np.int64) if keep else None
    top_scores = np.empty((len(targets), keep), dtype=np.float32) if keep else None
    for sl, scores in score_batches(retriever, histories, batch_size, progress, desc=desc):
        hist = histories[sl]
        ranks[sl] = ranks_of_targets(scores, targets[sl], history_mask(hist, scores.shape[1]), users=users[sl],
                                     seed=seed)
        if keep:
            top[sl], top_scores[sl] = top_k(scores, hist, keep, users=users[sl], seed=seed)  # type: ignore[index]
    return {"ranks": ranks, "top": top, "top_scores": top_scores}


def results_table(results: dict[str, dict[str, dict[str, float]]], stage: Stage = "test",
                  columns: Sequence[str] = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")) -> Any:
    """A rich Table of {model: {stage: metrics}}."""
    from rich.table import Table

    extra = sorted({c for r in results.values() for c in r.get(stage, {}) if c.startswith("Recall@")})
    table = Table(title=f"{stage} (full ranking, leave-one-out, seeded random ties)")
    table.add_column("model", min_width=12)
    for c in [*columns, *extra, "users"]:
        table.add_column(c, justify="right", no_wrap=True, min_width=6)
    for model, by_stage in results.items():
        m = by_stage.get(stage, {})
        cells = [f"{m[c]:.4f}" if isinstance(m.get(c), float) else str(m.get(c, "")) for c in [*columns, *extra]]
        table.add_row(model, *cells, str(m.get("users", "")))
    return table
