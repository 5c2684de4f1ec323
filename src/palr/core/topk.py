"""Exact top-k over the catalogue with the user's history excluded, equal scores in a seeded order
(:func:`tie_keys`), and the 1-based rank of a target in that same order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
