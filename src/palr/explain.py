"""Explanations that are true: each recommended item is explained by history items that really connect to it.

For a recommended item ``i`` the history items are ranked by the model's item embeddings (the retriever's, centred
so that a few "hub" items are not close to everything) plus the share of attributes they have in common; the best
one or two are named, each with the attributes **that pair** shares (``"Alien (1979)" (also Sci-Fi)``), never
the union over several items. A history item that shares no attribute is named only when the embeddings put it
close (and then says so). The recommended item's own title is never repeated (it stands next to the sentence),
catalogue text is quoted and cleaned (:func:`palr.prompts.clean_text`), and a history title that reads like an
instruction is never quoted. Items from the popularity fallback (no history) are explained by their popularity.

Each explanation is returned with its evidence (``because``: the history items and the shared attributes), so a
test can check every claim against the catalogue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from palr.data.dataset import Catalog
from palr.prompts import clean_text, looks_like_instruction

__all__ = ["Explanation", "explain_items", "explain_popular", "quote_title"]


@dataclass
class Explanation:
    """One sentence and the evidence behind it: ``because`` = [(history item index, shared attributes)]."""

    text: str
    because: list[tuple[int, list[str]]] = field(default_factory=list)

    def to_dict(self, catalog: Catalog) -> dict[str, Any]:
        return {"text": self.text, "because": [{"item": catalog.item_ids[h], "title": catalog.titles[h],
                                                "shared": list(shared)} for h, shared in self.because]}


def quote_title(catalog: Catalog, i: int, max_words: int = 10) -> str:
    """``"Title"`` cleaned and quoted; an instruction-like title is replaced by the item id."""
    title = catalog.titles[int(i)] or ""
    if not title or looks_like_instruction(title):
        return f"item {clean_text(catalog.item_ids[int(i)])}"
    return f'"{clean_text(title, max_words)}"'


def _unit_vectors(item_vectors: Callable[[], np.ndarray] | np.ndarray | None) -> np.ndarray | None:
    vecs = item_vectors() if callable(item_vectors) else item_vectors
    if vecs is None:
        return None
    vecs = np.asarray(vecs, dtype=np.float64)
    vecs = vecs - vecs.mean(axis=0, keepdims=True)
    return vecs / (np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-9)


def explain_items(catalog: Catalog, history: Sequence[int], items: Sequence[int],
                  item_vectors: Callable[[], np.ndarray] | np.ndarray | None = None, *, recent: int = 50,
                  max_reasons: int = 2, min_similarity: float = 0.2) -> list[Explanation]:
    """One :class:`Explanation` per recommended item (dense indices), from the last ``recent`` history items."""
    hist = list(dict.fromkeys(int(h) for h in history))[-recent:]
    hist = [h for h in hist if not looks_like_instruction(catalog.titles[h] or "")] or hist
    vecs = _unit_vectors(item_vectors)
    hist_tags = [set(catalog.tags(h)) for h in hist]
    out = []
    for i in items:
        i = int(i)
        tags = catalog.tags(i)
        tag_set = set(tags)
        shared = [[t for t in tags if t in ht] for ht in hist_tags]  # per pair, in the item's own tag order
        jacc = np.array([len(s) / max(1, len(tag_set | ht)) for s, ht in zip(shared, hist_tags)])
        cos = vecs[hist] @ vecs[i] if vecs is not None and hist else np.zeros(len(hist))
        score = cos + jacc
        order = np.lexsort((-np.arange(len(hist)), -score))  # ties: the more recent item
        because: list[tuple[int, list[str]]] = []
        for j in order:
            if len(because) == max_reasons:
                break
            if shared[j] or cos[j] >= min_similarity:
                because.append((hist[j], shared[j][:3]))
        out.append(Explanation(_sentence(catalog, because, bool(hist)), because))
    return out


def _sentence(catalog: Catalog, because: list[tuple[int, list[str]]], has_history: bool) -> str:
    if not because:
        return ("Ranked high for your history as a whole; no single item you chose is close to it."
                if has_history else "Popular with other users.")
    parts = []
    for h, shared in because:
        why = f" (also {', '.join(clean_text(t) for t in shared)})" if shared else " (close to it in the model's item embeddings)"
        parts.append(quote_title(catalog, h) + why)
    return f"Because you chose {' and '.join(parts)}."


def explain_popular(count: int, n_users: int) -> Explanation:
    """An item of the popularity fallback (no usable history)."""
    return Explanation(f"Popular: chosen by {count} of {n_users} users in the training data.")
