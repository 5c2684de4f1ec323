"""Explanations grounded in the user's history and profile: shared genres/categories and the most
similar history items (by the retriever's item embeddings when it has them, else by shared tags)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from palr.data.dataset import Catalog
from palr.prompts import clean_text


def explain_items(catalog: Catalog, history: Sequence[int], items: Sequence[int], profile: str | None,
                  item_vectors: Callable[[], np.ndarray] | None = None, recent: int = 20) -> list[str]:
    """One sentence per recommended item."""
    hist = [int(i) for i in history][-recent:]
    vecs = item_vectors() if item_vectors is not None else None
    if vecs is not None:  # centred, so that a few "hub" items are not similar to everything
        vecs = vecs - vecs.mean(axis=0, keepdims=True)
        vecs = vecs / (np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-9)
    out = []
    for i in items:
        tags = set(catalog.tags(i))
        # similarity = shared-tag Jaccard (+ cosine of the retriever's item embeddings when it has them)
        sim = np.array([len(tags & set(catalog.tags(h))) / max(1, len(tags | set(catalog.tags(h)))) for h in hist])
        if vecs is not None:
            sim = sim + vecs[hist] @ vecs[i]
        order = np.lexsort((-np.arange(len(hist)), -sim))  # ties: the more recent item
        similar = [hist[j] for j in order[:2]]
        shared = sorted(tags & {t for h in similar for t in catalog.tags(h)})
        names = " and ".join(f'"{clean_text(catalog.titles[h], 8)}"' for h in similar)
        because = f"because you liked {names}" if names else "popular with similar users"
        if shared:
            because += f" (shared: {', '.join(shared[:3])})"
        fits = [t for t in catalog.tags(i) if profile and t.lower() in profile.lower()]
        tail = f"; it fits your profile ({', '.join(fits[:2])})" if fits else ""
        out.append(f'"{clean_text(catalog.titles[i], 10)}": {because}{tail}.')
    return out
