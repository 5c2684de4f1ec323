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
    # the catalogue's titles processed once per catalogue (not per request), and an index of them for exact matches
    cached = getattr(catalog, "_title_match_index", None)
    if cached is None or cached[0] is not catalog.titles:
        processed = [utils.default_process(t or "") for t in catalog.titles]
        exact: dict[str, int] = {}
        for i, t in enumerate(processed):
            exact.setdefault(t, i)  # ties go to the lower index
        cached = (catalog.titles, processed, exact)
        try:
            catalog._title_match_index = cached  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover - a catalogue with __slots__
            pass
    _, processed, exact = cached
    out = []
    done: dict[str, tuple[float, int | None]] = {}  # a repeated query is matched once
    for q in queries:
        key = utils.default_process(q)
        if key not in done:
            if key and key in exact:  # WRatio of equal strings is 100: no need to score the catalogue
                done[key] = (100.0, exact[key])
            else:
                found = process.extract(key, processed, scorer=fuzz.WRatio, processor=None,
                                        score_cutoff=min_score, limit=5)
                best = max(found, key=lambda m: (round(m[1], 6), -m[2])) if found else None
                done[key] = (round(float(best[1]), 1), int(best[2])) if best else (0.0, None)
        score, idx = done[key]
        if idx is None:
            out.append(TitleMatch(q, None, None, 0.0))
        else:
            out.append(TitleMatch(q, catalog.item_ids[idx], catalog.titles[idx], score, idx))
    return out
