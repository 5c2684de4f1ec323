"""Honest evaluation: metrics (per user and averaged) on 1-based ranks, full ranking with the history
excluded, statistics over users (paired bootstrap, paired test) and over seeds."""

from palr.core.metrics import (
    DEFAULT_KS,
    hit_rate,
    metrics_from_ranks,
    mrr,
    ndcg,
    per_user_metrics,
    recall_of_candidates,
)
from palr.core.topk import history_mask, pessimistic_ranks, ranks_of_targets, tie_keys, top_k
from palr.evaluate.retrievers import evaluate_retriever, results_table
from palr.evaluate.stats import Comparison, compare_metrics, format_ratio, paired_bootstrap, summarize_seeds
from palr.retrieval.base import score_batches

__all__ = [
    "DEFAULT_KS", "Comparison", "compare_metrics", "evaluate_retriever", "format_ratio", "history_mask", "hit_rate",
    "metrics_from_ranks", "mrr", "ndcg", "paired_bootstrap", "per_user_metrics", "pessimistic_ranks",
    "ranks_of_targets", "recall_of_candidates", "results_table", "score_batches", "summarize_seeds", "tie_keys", "top_k",
]
