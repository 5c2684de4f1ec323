"""A history given by title (``--history-titles "Star Wars (1977)|Fargo (1996)"``), matched to catalogue items.

Matching uses rapidfuzz (``WRatio`` on lower-cased titles, year included when given): the best match at or above
``min_score`` wins, ties go to the lower item index (deterministic). Every query is reported back, matched or
not, so a typo is never dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from palr.core.errors import PalrError
from palr.data.dataset import Catalog

__all__ = ["TitleMatch", "match_titles", "split_titles"]


@dataclass
class TitleMatch:
    """One query: the item it matched (original id, title) and the score (0-100), or ``item=None``."""

    query: str
    item: str | None
    title: str | None
    score: float
    index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("index")
        return d


def split_titles(text: str) -> list[str]:
    """``"A|B"`` -> ["A", "B"] (titles hold commas, so "|" separates them)."""
    return [t.strip() for t in text.split("|") if t.strip()]


def match_titles(catalog: Catalog, queries: Sequence[str], min_score: float = 85.0) -> list[TitleMatch]:
    """The best catalogue item for each title query (see the module docstring)."""
    try:
        from rapidfuzz import fuzz, process, utils
    except ImportError as e:  # pragma: no cover - rapidfuzz is a core dependency
        raise PalrError("matching titles needs rapidfuzz: pip install rapidfuzz") from e
    choices = [t or "" for t in catalog.titles]
    out = []
    for q in queries:
        found = process.extract(q, choices, scorer=fuzz.WRatio, processor=utils.default_process,
                                score_cutoff=min_score, limit=5)
        if not found:
            out.append(TitleMatch(q, None, None, 0.0))
            continue
        best = max(found, key=lambda m: (round(m[1], 6), -m[2]))
        _, score, idx = best
        out.append(TitleMatch(q, catalog.item_ids[idx], catalog.titles[idx], round(float(score), 1), int(idx)))
    return out
