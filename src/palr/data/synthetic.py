"""Small synthetic data sets with planted structure, for tests and examples (no files needed).

Each user prefers one genre; with probability ``p_next`` the next item is the successor of the
previous one (item k -> k+1, a planted sequential pattern), otherwise a random item of the
preferred genre (with a little noise). Timestamps include ties to exercise the stable sort.
"""

from __future__ import annotations

import numpy as np

from palr.data.dataset import Dataset
from palr.data.preprocess import preprocess
from palr.data.sources import RawData

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def synthetic_raw(n_users: int = 200, n_items: int = 120, min_len: int = 8, max_len: int = 30,
                  p_next: float = 0.7, seed: int = 0) -> RawData:
    rng = np.random.default_rng(seed)
    item_genre = np.arange(n_items) % len(GENRES)
    by_genre = [np.flatnonzero(item_genre == g) for g in range(len(GENRES))]
    users, items, times = [], [], []
    for u in range(n_users):
        g = int(rng.integers(len(GENRES)))
        length = int(rng.integers(min_len, max_len + 1))
        seq: list[int] = []
        cur = int(rng.choice(by_genre[g]))
        while len(seq) < length:
            if cur not in seq:
                seq.append(cur)
            if rng.random() < p_next:
                cur = (cur + 1) % n_items
            elif rng.random() < 0.9:
                cur = int(rng.choice(by_genre[g]))
            else:
                cur = int(rng.integers(n_items))
        t0 = int(rng.integers(1_000_000, 2_000_000))
        for k, it in enumerate(seq):
            users.append(f"u{u}")
            items.append(str(it + 1))
            times.append(float(t0 + (k // 2) * 60))  # pairs share a timestamp: ties keep file order
    titles = {str(i + 1): f"Movie {i + 1} ({1950 + (i * 7) % 70})" for i in range(n_items)}
    attrs = {str(i + 1): {"genres": [GENRES[item_genre[i]]], "year": 1950 + (i * 7) % 70} for i in range(n_items)}
    return RawData(users, items, times, titles, attrs, "movies", ["<synthetic>"])


def synthetic_dataset(n_users: int = 200, n_items: int = 120, seed: int = 0, **kw: float) -> Dataset:
    """A preprocessed synthetic data set named ``synthetic``."""
    return preprocess(synthetic_raw(n_users, n_items, seed=seed, **kw), "synthetic")  # type: ignore[arg-type]
