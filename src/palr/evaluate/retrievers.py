"""Full-ranking evaluation of retrievers on valid and test (sharded under torchrun), and the results table."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from palr.core import distributed
from palr.core.metrics import DEFAULT_KS, metrics_from_ranks, recall_of_candidates
from palr.core.topk import history_mask, ranks_of_targets, top_k
from palr.data.dataset import Split, Stage
from palr.retrieval.base import score_batches

if TYPE_CHECKING:
    from palr.retrieval.base import Retriever


log = logging.getLogger(__name__)


def evaluate_retriever(retriever: Retriever, split: Split, stage: Stage, ks: Sequence[int] = DEFAULT_KS,
                       candidates: int = 0, predictions: int = 0, batch_size: int = 512,
                       progress: bool = False, seed: int = 0, users: np.ndarray | None = None,
                       sharded: bool = False) -> dict[str, Any] | None:
    """Full ranking of every user's target for ``stage`` (of ``users`` only, when given); ties in the random order
    of ``seed`` (:func:`tie_keys`), so a target's rank is its position in the written lists.

    Returns {"metrics": {...}, "ranks": (U,), "candidates": (U, c) or None, "predictions": (U, p) or None,
    "seconds": float}; with ``candidates`` > 0 the metrics include ``Recall@c``.
    ``sharded``: under a launcher with several processes each ranks its block of the users
    (:func:`palr.distributed.shard`, whole batches) and the main process gets the gathered result, identical to one
    process's; the other processes get None.
    """

    histories = split.histories(stage)
    targets = split.targets(stage)
    sel = np.arange(len(targets)) if users is None else np.asarray(users, dtype=np.int64)
    # lists hold no history item, so they can be no longer than the items left beside the longest history
    available = split.n_items - max((len(np.unique(h)) for h in histories), default=0)
    keep = min(max(candidates, predictions), max(available, 0))
    if keep < max(candidates, predictions):
        log.warning("%s: lists cut to %d items: a user's history leaves only %d of %d items",
                    stage, keep, available, split.n_items)
    mine = sel[distributed.shard(len(sel), batch_size)] if sharded else sel
    t0 = time.perf_counter()
    part = _rank_users(retriever, [histories[u] for u in mine], targets[mine], mine, keep, batch_size, progress,
                       f"{stage} ranking", seed)
    if sharded:
        part = distributed.gather_arrays(part)
        if part is None:
            return None
    seconds = time.perf_counter() - t0
    ranks, top, top_scores = part["ranks"], part["top"], part["top_scores"]
    metrics = metrics_from_ranks(ranks, ks)
    if candidates:
        metrics[f"Recall@{candidates}"] = recall_of_candidates(top[:, :candidates], targets[sel])  # type: ignore[index]
    return {
        "metrics": metrics,
        "ranks": ranks,
        "candidates": None if top is None else top[:, :candidates] if candidates else None,
        "candidate_scores": None if top_scores is None or not candidates else top_scores[:, :candidates],
        "predictions": None if top is None else top[:, : predictions or keep],
        "seconds": seconds,
    }


def _rank_users(retriever: Retriever, histories: Sequence[np.ndarray], targets: np.ndarray, users: np.ndarray,
                keep: int, batch_size: int, progress: bool, desc: str, seed: int) -> dict[str, Any]:
    """Ranks of the targets and the best ``keep`` items (history excluded) of the given users (their indices
    ``users`` key the ties, so a user's result does not depend on the batch or the process it is scored in)."""
    ranks = np.empty(len(targets), dtype=np.int64)
    top = np.empty((len(targets), keep), dtype=np.int64) if keep else None
    top_scores = np.empty((len(targets), keep), dtype=np.float32) if keep else None
    for sl, scores in score_batches(retriever, histories, batch_size, progress, desc=desc):
        hist = histories[sl]
        ranks[sl] = ranks_of_targets(scores, targets[sl], history_mask(hist, scores.shape[1]), users=users[sl],
                                     seed=seed)
        if keep:
            top[sl], top_scores[sl] = top_k(scores, hist, keep, users=users[sl], seed=seed)  # type: ignore[index]
    return {"ranks": ranks, "top": top, "top_scores": top_scores}


def results_table(results: dict[str, dict[str, dict[str, float]]], stage: Stage = "test",
                  columns: Sequence[str] = ("HR@10", "NDCG@10", "HR@20", "NDCG@20"),
                  labels: dict[str, str] | None = None) -> Any:
    """A rich Table of {model: {stage: metrics}}; ``labels``: {model: what ordered it} (a "ranked by" column)."""
    from rich.table import Table

    extra = sorted({c for r in results.values() for c in r.get(stage, {}) if c.startswith("Recall@")})
    table = Table(title=f"{stage} (full ranking, leave-one-out, seeded random ties)")
    table.add_column("model", min_width=12)
    if labels:
        table.add_column("ranked by", min_width=12)
    for c in [*columns, *extra, "users"]:
        table.add_column(c, justify="right", no_wrap=True, min_width=6)
    for model, by_stage in results.items():
        m = by_stage.get(stage, {})
        cells = [f"{m[c]:.4f}" if isinstance(m.get(c), float) else str(m.get(c, "")) for c in [*columns, *extra]]
        by = [labels.get(model, "")] if labels else []
        table.add_row(model, *by, *cells, str(m.get("users", "")))
    return table
