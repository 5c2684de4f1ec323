"""The canonical protocol: dedupe, iterative 5-core, stable time sort, sorted id maps.

Ties in timestamps keep the file order (a stable sort); they are never broken by item id, which
leaks popularity order into the split and inflates metrics (LRURec issue #1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from palr.data.dataset import Catalog, Dataset, id_sort_key
from palr.data.sources import RawData
from palr.errors import PalrError

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


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the interactions that survive iterative k-core filtering."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        u, ucnt = np.unique(users[keep], return_counts=True)
        i, icnt = np.unique(items[keep], return_counts=True)
        bad_u = u[ucnt < k]
        bad_i = i[icnt < k]
        if len(bad_u) == 0 and len(bad_i) == 0:
            return keep
        keep &= ~np.isin(users, bad_u) & ~np.isin(items, bad_i)


def preprocess(raw: RawData, name: str, min_count: int = 5) -> Dataset:
    """Turn raw interactions into a :class:`Dataset` under the canonical protocol."""
    if not raw.users:
        raise PalrError(f"data set {name!r} has no interactions")
    df = pd.DataFrame({"user": raw.users, "item": raw.items})
    df["order"] = np.arange(len(df))
    if raw.times is not None:
        df["time"] = np.asarray(raw.times, dtype=np.float64)
        df = df.sort_values(["time", "order"], kind="stable")  # chronological, ties in file order
    df = df.drop_duplicates(["user", "item"], keep="first")
    ucodes, _ = pd.factorize(df["user"].to_numpy(), sort=False)
    icodes, _ = pd.factorize(df["item"].to_numpy(), sort=False)
    keep = k_core(ucodes, icodes, min_count) if min_count > 1 else np.ones(len(df), bool)
    df = df[keep]
    if df.empty:
        raise PalrError(f"data set {name!r}: nothing survives {min_count}-core filtering "
                        f"(every user and item needs at least {min_count} interactions)")
    user_ids = sorted(df["user"].unique().tolist(), key=id_sort_key)
    item_ids = sorted(df["item"].unique().tolist(), key=id_sort_key)
    umap = {u: i for i, u in enumerate(user_ids)}
    imap = {it: i for i, it in enumerate(item_ids)}
    df = df.assign(u=df["user"].map(umap).to_numpy(), i=df["item"].map(imap).to_numpy())
    # group per user keeping the chronological order already established
    df = df.sort_values("u", kind="stable")
    bounds = np.flatnonzero(np.diff(df["u"].to_numpy())) + 1
    seqs = [s.astype(np.int64) for s in np.split(df["i"].to_numpy(), bounds)]
    catalog = Catalog(
        item_ids=item_ids,
        titles=[raw.titles.get(it) or it for it in item_ids],
        attributes=[raw.attributes.get(it, {}) for it in item_ids],
        kind=raw.kind,
    )
    user_attrs = [raw.user_attributes.get(u, {}) for u in user_ids] if raw.user_attributes else None
    proto = protocol(min_count, raw.times is None)
    return Dataset(name, user_ids, seqs, catalog, proto, user_attrs)
