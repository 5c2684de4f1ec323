"""The ranker plug point: one :class:`Ranker` protocol, one :class:`RankResult`, and the labels that say what ranked.

Every ranker (the LLM ranker, the feature trees, the fused trees + LLM) takes the retriever's candidates and gives
a permutation of each row, best first. What a call consulted travels in its result (``components``, ``notes``),
never on the ranker: one ranker serves many threads at once.

Component names: ``"LLM"``, ``"trees"``, ``"<retriever> rank"`` / ``"<retriever> score"`` (the retriever's prior
fused in), ``"<retriever> order"`` (the retriever's order alone). :func:`label` joins them into what tables, results
files, the console and the API show: ``"trees + LLM"``, ``"trees (LLM unused: weight 0 on held-out users)"``,
``"LLM + sasrec rank"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

LLM = "LLM"
TREES = "trees"


@dataclass
class RankResult:
    """One call's ranking. Rows are users; columns are candidates."""

    order: np.ndarray  # (B, K) item indices, best first: a permutation of each row's candidates
    scores: np.ndarray  # (B, K) the ranking scores aligned with ``order``
    llm_logprobs: np.ndarray  # (B, K) aligned with the *input* candidates (NaN where the LLM failed or was not asked)
    failed: np.ndarray  # (B,) bool: the LLM failed for this row and the ranker's fallback order stands
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # this call's notes (failures, fallbacks)
    invalid_generations: int = 0
    candidate_scores: np.ndarray | None = None  # (B, K) the same scores aligned with the input candidates
    components: tuple[str, ...] = ()  # what ordered the rows that did not fail
    fallback: tuple[str, ...] = ()  # what ordered the failed rows

    def ranked_by(self, row: int) -> str:
        """What ordered row ``row``: ``"trees + LLM"``, or ``"sasrec order (LLM failed)"``."""
        if self.failed[row]:
            return " + ".join(self.fallback) + " (LLM failed)"
        return " + ".join(self.components)

    def consulted(self, row: int) -> list[str]:
        return list(self.fallback if self.failed[row] else self.components)


@runtime_checkable
class Ranker(Protocol):
    """Ranks candidate lists. Capabilities are declared, never probed:

    ``llm_ranker``: the LLM ranker inside (itself for the LLM ranker, ``None`` for the trees), for the LLM-alone
    figures, LLM-written explanations and the LLM's counters; ``components``: what the ranker's order consults at
    its current weight; ``label``: those components as one line, saying when an LLM it holds goes unused."""

    mode: str
    fusion: str
    weight: float
    batch_size: int

    @property
    def llm_ranker(self) -> Any: ...

    @property
    def components(self) -> tuple[str, ...]: ...

    @property
    def label(self) -> str: ...

    @property
    def failed_users(self) -> int: ...

    def rank(self, histories: Sequence[np.ndarray], profiles: Sequence[str | None], candidates: np.ndarray,
             scores: np.ndarray | None = None, users: np.ndarray | None = None, *,
             weight: float | None = None) -> RankResult:
        """Rank each row of ``candidates`` (B, N) (retriever order, best first; ``scores`` (B, N) the retriever's;
        ``users`` (B,) data set rows, for user features; ``weight`` replaces the ranker's LLM weight for this call)."""
        ...


def note_failed_rows(failed: np.ndarray, notes: list[str], stands: str = "") -> int:
    """The number of rows the LLM gave no usable scores for; a note saying so (and what order ``stands`` in their
    place) is added to this call's ``notes`` unless a failure was noted already."""
    n = int(failed.sum())
    if n and not notes:
        notes.append(f"the LLM gave no usable scores for {n} of {len(failed)} users" + (f": {stands} stands" if stands else ""))
    return n


def label(components: Sequence[str], unused_llm: str = "") -> str:
    """``"trees + LLM"``; with ``unused_llm`` (why the ranker's LLM did not count): ``"trees (LLM unused: ...)"``."""
    text = " + ".join(components)
    return f"{text} (LLM unused: {unused_llm})" if unused_llm else text


def unused_reason(weight: float, chosen_on: str = "") -> str:
    w = "inf" if weight == float("inf") else f"{weight:g}"
    return f"weight {w}" + (f" on {chosen_on}" if chosen_on else "")


def palr_label(ranker: Ranker) -> str:
    """The table name of a ranker's order: ``"PALR: trees + LLM"``."""
    return f"PALR: {ranker.label}"


__all__ = ["LLM", "TREES", "RankResult", "Ranker", "label", "palr_label", "unused_reason"]
