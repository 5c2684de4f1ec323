"""The canonical protocol: dedupe, iterative 5-core, stable time sort, sorted id maps.

Ties in timestamps keep the file order (a stable sort); they are never broken by item id, which
leaks popularity order into the split and inflates metrics (LRURec issue #1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from palr.core.errors import PalrError
from palr.data.columns import Ids
from palr.data.dataset import Catalog, Dataset, id_sort_key
from palr.data.sources import RawData

PROTOCOL_VERSION = 1


def protocol(min_count: int, ordered: bool) -> dict[str, Any]:
    return {
        "version": PROTOCOL_VERSION,
        "interactions": "every rating/review counts; a repeated (user, item) keeps its earliest occurrence",
        "core": f"iterative {min_count}-core on users and items",
        "order": "file order (already chronological)" if ordered else "stable sort by timestamp; ties keep file order",
        "split": "leave-one-out: last = test, second-to-last = validation, rest = train",
        "ranking": "full ranking over all items; the user's history (everything before the target) is excluded",
        "ties": "equal scores in a seeded random order per user (never the item id); a target's rank is its "
                "position in the lists written to predictions",
    }


def _dense_codes(x: np.ndarray) -> np.ndarray:
    """Non-negative integer codes (x itself when it already is a compact code array)."""
    x = np.asarray(x)
    if x.dtype.kind in "iu" and len(x) and x.min() >= 0 and x.max() < 4 * len(x) + 1024:
        return x
    return pd.factorize(x, sort=False)[0]


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the interactions that survive iterative k-core filtering (counts by bincount)."""
    u, i = _dense_codes(users), _dense_codes(items)
    keep = np.ones(len(u), dtype=bool)
    while True:
        ucnt = np.bincount(u[keep], minlength=int(u.max(initial=0)) + 1)
        icnt = np.bincount(i[keep], minlength=int(i.max(initial=0)) + 1)
        bad = keep & ((ucnt[u] < k) | (icnt[i] < k))
        if not bad.any():
            return keep
        keep &= ~bad


def group_order(keys: np.ndarray, n_keys: int) -> np.ndarray:
    """A stable argsort of non-negative integer ``keys`` < ``n_keys``: numpy radix-sorts 16-bit keys, so wider
    keys are sorted 16 bits at a time, least significant first (each pass stable; at most 3 passes)."""
    if n_keys > 2**48:
        return np.argsort(keys, kind="stable")
    keys = np.asarray(keys, dtype=np.int64)
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    for shift in (16, 32):
        if n_keys > 1 << shift:
            order = order[np.argsort(((keys[order] >> shift) & 0xFFFF).astype(np.uint16), kind="stable")]
    return order


def time_order(times: np.ndarray) -> np.ndarray:
    """Stable chronological order (ties keep file order); whole-second times use the radix passes."""
    t = np.asarray(times, dtype=np.float64)
    if len(t):
        lo, hi = float(t.min()), float(t.max())
        if hi - lo < 2**48 and np.array_equal(t, np.floor(t)):
            return group_order((t - lo).astype(np.int64), int(hi - lo) + 1)
    return np.argsort(t, kind="stable")


def _sorted_ids(codes: np.ndarray, vocab: list[str]) -> tuple[list[str], np.ndarray]:
    """(original ids of the codes in use, sorted by id_sort_key; code -> dense index, -1 for unused codes)."""
    used = np.flatnonzero(np.bincount(codes, minlength=len(vocab)))
    ids = sorted((vocab[c] for c in used.tolist()), key=id_sort_key)
    pos = {v: j for j, v in enumerate(ids)}
    dense = np.full(len(vocab), -1, dtype=np.int64)
    dense[used] = [pos[vocab[c]] for c in used.tolist()]
    return ids, dense


def preprocess(raw: RawData, name: str, min_count: int = 5) -> Dataset:
    """Turn raw interactions into a :class:`Dataset` under the canonical protocol (vectorised: integer
    codes throughout, no Python loop per interaction)."""
    users, items = Ids.of(raw.users), Ids.of(raw.items)
    if len(users) == 0:
        raise PalrError(f"data set {name!r} has no interactions")
    if raw.times is not None:
        order = time_order(raw.times)  # chronological, ties in file order
        u, i = users.codes[order].astype(np.int64), items.codes[order].astype(np.int64)
        del order
    else:
        u, i = users.codes.astype(np.int64), items.codes.astype(np.int64)
    first = ~pd.Series(u * len(items.vocab) + i).duplicated(keep="first").to_numpy()  # earliest (user, item)
    u, i = u[first], i[first]
    if min_count > 1:
        keep = k_core(u, i, min_count)
        u, i = u[keep], i[keep]
    if len(u) == 0:
        raise PalrError(f"data set {name!r}: nothing survives {min_count}-core filtering "
                        f"(every user and item needs at least {min_count} interactions)")
    user_ids, dense_u = _sorted_ids(u, users.vocab)
    item_ids, dense_i = _sorted_ids(i, items.vocab)
    u, i = dense_u[u], dense_i[i]
    # group per user keeping the chronological order already established
    by_user = group_order(u, len(user_ids))
    bounds = np.cumsum(np.bincount(u, minlength=len(user_ids)))[:-1]
    seqs = np.split(i[by_user], bounds)
    catalog = Catalog(
        item_ids=item_ids,
        titles=[raw.titles.get(it) or it for it in item_ids],
        attributes=[raw.attributes.get(it, {}) for it in item_ids],
        kind=raw.kind,
    )
    user_attrs = [raw.user_attributes.get(x, {}) for x in user_ids] if raw.user_attributes else None
    proto = protocol(min_count, raw.times is None)
    return Dataset(name, user_ids, seqs, catalog, proto, user_attrs)
