"""Retriever runs: fit on the training split, validate, save; evaluate a saved run on test."""

from __future__ import annotations

import numpy as np

from palr.core import distributed
from palr.core.topk import top_k
from palr.data import Split
from palr.data.dataset import Stage
from palr.retrieval.base import Retriever, score_batches


def candidates_for(model: Retriever, split: Split, stage: Stage, k: int = 50,
                   batch_size: int = 512, sharded: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` candidates for every user's ``stage`` target, the history before it excluded.

    Returns (items (U, k) int64 dense item indices, scores (U, k) float32), best first, ties in the seeded
    random order of the evaluation (seed 0); row u is user u of ``split`` (the target itself is never excluded).
    ``sharded``: under a launcher with several processes each computes its block of users and every process gets
    all rows.
    """

    histories = split.histories(stage)
    k = min(k, split.n_items)
    mine = distributed.shard(len(histories), batch_size) if sharded else np.arange(len(histories))
    lo = int(mine[0]) if len(mine) else 0
    block = histories[lo:lo + len(mine)]
    items = np.empty((len(block), k), dtype=np.int64)
    scores = np.empty((len(block), k), dtype=np.float32)
    for sl, s in score_batches(model, block, batch_size):
        items[sl], scores[sl] = top_k(s, block[sl], k, users=np.arange(lo + sl.start, lo + sl.stop))
    if sharded:
        both = distributed.gather_arrays({"items": items, "scores": scores}, everyone=True)
        assert both is not None
        items, scores = both["items"], both["scores"]
    return items, scores
