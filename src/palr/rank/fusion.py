"""The full PALR ranker: the LLM's candidate scores fused with the feature re-ranker's.

``score = trees(features) + w * log_softmax(LLM log-probs over the candidates)``; ``w`` is chosen on the
**held-out validation users** (the share that trained neither the trees nor the LLM); ``w = 0`` is the
feature ranker alone, and the table of every ``w`` is kept in the run. A run ranks this way only when it
beats the LLM fused with the retriever's rank on those users (``metrics.json``: ``features.chosen``). If the LLM fails for a user, the
feature ranker's order stands and the result says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from palr.core.metrics import ndcg
from palr.rank.llm_ranker import Ranker, RankResult, order_by, positional_ranks
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
    """LLM verbalizer scores + feature-ranker scores; the same ``rank`` contract as the other rankers."""

    mode = "verbalizer+features"
    fusion = "features"  # ``weight`` multiplies the LLM's log-softmax added to the trees' score

    def __init__(self, llm_ranker: Ranker, features: FeatureRanker, weight: float) -> None:
        self.llm_ranker, self.features, self.weight = llm_ranker, features, weight
        self.batch_size = llm_ranker.batch_size
        self._failed = 0  # users whose LLM scores failed here (the trees' order stood)

    # the LLM ranker's parts, reached through the fused ranker (swapping ``llm`` swaps the inner one's)
    @property
    def llm(self) -> Any:
        return self.llm_ranker.llm

    @llm.setter
    def llm(self, value: Any) -> None:
        self.llm_ranker.llm = value

    @property
    def failed_users(self) -> int:
        return int(self.llm_ranker.failed_users) + self._failed

    @property
    def builder(self) -> Any:
        return self.llm_ranker.builder

    def verbalizer_logprobs(self, histories: Sequence[np.ndarray], profiles: Sequence[str | None],
                            candidates: np.ndarray) -> np.ndarray:
        return self.llm_ranker.verbalizer_logprobs(histories, profiles, candidates)

    def score_candidates(self, histories: Sequence[np.ndarray], profiles: Sequence[str | None],
                         candidates: np.ndarray, scores: np.ndarray | None = None, weight: float | None = None,
                         users: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fused scores (B, K) in candidate order, LLM log-probs (NaN where it failed), failed (B,))."""
        w = self.weight if weight is None else weight
        s = np.zeros(candidates.shape, np.float32) if scores is None else scores
        trees = self.features.scores(list(histories), candidates, s, users)
        self._notes: list[str] = []
        lp = np.zeros(candidates.shape, np.float32)
        failed = np.zeros(len(histories), bool)
        if w:
            try:
                lp = self.llm_ranker.verbalizer_logprobs(histories, profiles, candidates)
            except Exception as e:
                if not getattr(self.llm_ranker, "allow_fallback", True):
                    raise
                log.warning("LLM ranking failed (%s: %s); keeping the feature ranker's order", type(e).__name__, e)
                self._notes.append(f"LLM failed: {type(e).__name__}: {e}")
                lp = np.full(candidates.shape, np.nan, np.float32)
            failed = ~np.isfinite(lp).all(axis=1)
            self._failed += int(failed.sum())
        fused = fuse_with_features(trees, np.where(np.isfinite(lp), lp, 0.0), w)
        fused[failed] = break_ties(trees)[failed]
        return fused, lp, failed

    def rank(self, histories: Sequence[np.ndarray], profiles: Sequence[str | None], candidates: np.ndarray,
             scores: np.ndarray | None = None, weight: float | None = None, users: np.ndarray | None = None,
             ) -> RankResult:
        t0 = time.perf_counter()
        fused, lp, failed = self.score_candidates(histories, profiles, candidates, scores, weight, users)
        order, ordered = order_by(fused, candidates)
        return RankResult(order, ordered, lp, failed, time.perf_counter() - t0, list(self._notes))


def held_out_table(llm_ranker: Ranker, features: FeatureRanker, vs: Any) -> dict[str, Any]:
    """On a validation set (held-out users): LLM log-probs, tree scores, and the chosen fusion weight."""
    lp = llm_ranker.verbalizer_logprobs(vs.histories, vs.profiles, vs.candidates)
    trees = features.scores(list(vs.histories), vs.candidates, vs.scores, vs.users)
    w, table = choose_feature_weight(trees, lp, vs.candidates, vs.targets)
    return {"weight": w, "ndcg@10_by_weight": table, "ndcg@10": table[str(w)], "ndcg@10_features": table["0.0"],
            "users": len(vs.users)}


__all__ = ["FusedRanker", "choose_feature_weight", "fuse_with_features", "held_out_table"]
