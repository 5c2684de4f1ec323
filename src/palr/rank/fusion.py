"""The full PALR ranker: the LLM's candidate scores fused with the feature re-ranker's.

``score = trees(features) + w * log_softmax(LLM log-probs over the candidates)``; ``w`` is chosen on the
**held-out validation users** (the share that trained neither the trees nor the LLM); ``w = 0`` is the
feature ranker alone, and the table of every ``w`` is kept in the run. A run ranks this way only when it
beats the LLM fused with the retriever's rank on those users (``metrics.json``: ``features.chosen``). If the LLM fails for a user, the
feature ranker's order stands and the result says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from palr.core.errors import LLMRequestFailed, LLMUnavailable
from palr.core.metrics import ndcg
from palr.rank.llm_ranker import LLMRanker, order_by, positional_ranks
from palr.rank.protocol import LLM, TREES, RankResult, label, note_failed_rows, unused_reason
from palr.rank.trees import FeatureRanker, break_ties

log = logging.getLogger(__name__)

FEATURE_FUSION_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x - np.logaddexp.reduce(x, axis=1, keepdims=True)


def fuse_with_features(tree_scores: np.ndarray, llm_logprobs: np.ndarray, weight: float) -> np.ndarray:
    """(B, K) fused scores, candidates in retriever order; ties go to the retriever's order."""
    return break_ties(np.asarray(tree_scores, np.float64) + weight * log_softmax(llm_logprobs))


def choose_feature_weight(tree_scores: np.ndarray, llm_logprobs: np.ndarray, candidates: np.ndarray,
                          targets: np.ndarray, grid: Sequence[float] = FEATURE_FUSION_GRID, k: int = 10,
                          ) -> tuple[float, dict[str, float]]:
    """The weight with the best NDCG@k on the given (held-out validation) users; ties prefer the smaller."""

    table = {str(w): ndcg(positional_ranks(fuse_with_features(tree_scores, llm_logprobs, w), candidates, targets), k)
             for w in grid}
    best = max(grid, key=lambda w: (round(table[str(w)], 12), -w))
    return float(best), table


class FusedRanker:
    """LLM verbalizer scores + feature-ranker scores; implements :class:`palr.rank.protocol.Ranker`. With weight 0
    the LLM is not asked (the trees alone rank, and the label says so). ``chosen_on``: where ``weight`` was chosen."""

    mode = "verbalizer+features"
    fusion = "features"  # ``weight`` multiplies the LLM's log-softmax added to the trees' score

    def __init__(self, llm_ranker: LLMRanker, features: FeatureRanker, weight: float, chosen_on: str = "") -> None:
        self.llm_ranker, self.features, self.weight, self.chosen_on = llm_ranker, features, weight, chosen_on
        self.batch_size = llm_ranker.batch_size
        self._failed = 0  # users whose LLM scores failed here (the trees' order stood)
        self._lock = threading.Lock()  # the counter only: per-call notes travel in each RankResult

    @property
    def failed_users(self) -> int:
        return int(self.llm_ranker.failed_users) + self._failed

    def components_at(self, weight: float) -> tuple[str, ...]:
        return (TREES, LLM) if weight else (TREES,)

    @property
    def components(self) -> tuple[str, ...]:
        return self.components_at(self.weight)

    @property
    def label(self) -> str:
        return label(self.components, "" if self.weight else unused_reason(self.weight, self.chosen_on))

    def rank(self, histories: Sequence[np.ndarray], profiles: Sequence[str | None], candidates: np.ndarray,
             scores: np.ndarray | None = None, users: np.ndarray | None = None, *, weight: float | None = None,
             ) -> RankResult:
        """The trees' scores + ``weight`` x the LLM's log-softmax; a row whose LLM scores fail keeps the trees'
        order (with ``allow_fallback`` for a backend failure; without it the error stops the call)."""
        t0 = time.perf_counter()
        w = self.weight if weight is None else weight
        s = np.zeros(candidates.shape, np.float32) if scores is None else scores
        trees = self.features.scores(list(histories), candidates, s, users)
        notes: list[str] = []
        lp = np.full(candidates.shape, np.nan, np.float32)  # not asked (weight 0)
        failed = np.zeros(len(histories), bool)
        if w:
            try:
                lp = self.llm_ranker.verbalizer_logprobs(histories, profiles, candidates)
            except (LLMUnavailable, LLMRequestFailed) as e:
                if not self.llm_ranker.allow_fallback:
                    raise
                log.warning("LLM ranking failed (%s: %s); keeping the feature ranker's order", type(e).__name__, e)
                notes.append(f"LLM failed: {type(e).__name__}: {e}: the trees' order stands (--allow-fallback)")
            failed = ~np.isfinite(lp).all(axis=1)
            if n_failed := note_failed_rows(failed, notes, "the trees' order"):
                with self._lock:
                    self._failed += n_failed
        fused = fuse_with_features(trees, np.where(np.isfinite(lp), lp, 0.0), w)
        fused[failed] = break_ties(trees)[failed]
        order, ordered = order_by(fused, candidates)
        return RankResult(order, ordered, lp, failed, time.perf_counter() - t0, notes, candidate_scores=fused,
                          components=self.components_at(w), fallback=(TREES,))


def held_out_table(llm_ranker: LLMRanker, features: FeatureRanker, vs: Any) -> dict[str, Any]:
    """On a validation set (held-out users): LLM log-probs, tree scores, and the chosen fusion weight."""
    lp = llm_ranker.verbalizer_logprobs(vs.histories, vs.profiles, vs.candidates)
    trees = features.scores(list(vs.histories), vs.candidates, vs.scores, vs.users)
    w, table = choose_feature_weight(trees, lp, vs.candidates, vs.targets)
    return {"weight": w, "ndcg@10_by_weight": table, "ndcg@10": table[str(w)], "ndcg@10_features": table["0.0"],
            "users": len(vs.users)}


__all__ = ["FusedRanker", "choose_feature_weight", "fuse_with_features", "held_out_table"]
