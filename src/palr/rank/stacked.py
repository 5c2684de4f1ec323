"""One learned ranker over every signal: retriever(s), collaborative, text, user attributes **and the LLM's scores**.

The stacked PALR ranker is LightGBM lambdarank (the trees of :mod:`palr.rank.trees`) whose features are
:class:`palr.rank.features.CandidateFeatures`, each candidate source's score and rank
(:class:`palr.retrieval.candidates.CandidateSources`, when candidates are merged from several retrievers) and the
fine-tuned LLM's per-candidate scores (:data:`LLM_FEATURES`: its log-prob, log-softmax over the list, rank among
the candidates, gap to its best candidate).

It is fitted on **validation users' genuine candidates** whose validation target the LLM never trained on
(fine-tuning's examples are checked: a user whose validation item is any example's target is left out), the
held-out validation users stop the boosting; the test split is never used. Its twin -- the same trees without
the LLM features, fitted on the same lists of the same users with the same settings -- is kept in the run so
that the LLM's contribution is a paired comparison (``palr evaluate``: "PALR vs the same ranker without LLM
features"). With no LLM (``llm_ranker=None``) the twin alone is the trees-only ranker of
``palr finetune --ranker features`` over merged candidates.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from palr.core.errors import LLMRequestFailed, LLMUnavailable, PalrError
from palr.core.metrics import ndcg
from palr.data.dataset import Split
from palr.rank.features import CandidateFeatures
from palr.rank.llm_ranker import order_by, positional_ranks
from palr.rank.protocol import LLM, TREES, RankResult, note_failed_rows
from palr.rank.trees import (
    FeatureRankerConfig,
    break_ties,
    feature_lists,
    fit_trees,
    labelled,
    load_booster,
    require_lightgbm,
)
from palr.retrieval.candidates import CandidateSources
from palr.runs.safety import read_json

log = logging.getLogger(__name__)

LLM_FEATURES = ["llm_logprob", "llm_logsoftmax", "llm_rank", "llm_gap"]
NO_LLM_LABEL = "same ranker without LLM features"


def llm_features(lp: np.ndarray) -> np.ndarray:
    """(B, K, 4) from the LLM's (B, K) candidate log-probs; a user whose LLM failed (non-finite) gets NaN
    (LightGBM's missing value)."""
    lp = np.asarray(lp, np.float64)
    ok = np.isfinite(lp).all(axis=1)
    x = np.where(ok[:, None], lp, 0.0)
    lsm = x - np.logaddexp.reduce(x, axis=1, keepdims=True)
    rank = 1 + np.argsort(np.argsort(-x, axis=1, kind="stable"), axis=1)
    gap = x - x.max(axis=1, keepdims=True)
    out = np.stack([x, lsm, rank, gap], axis=2).astype(np.float32)
    out[~ok] = np.nan
    return out


class StackedRanker:
    """Trees over features + source features (+ LLM features); implements :class:`palr.rank.protocol.Ranker`.
    ``twin``: the booster without LLM features (:meth:`without_llm` ranks with it, for the paired comparison)."""

    fusion = "stacked"

    def __init__(self, features: CandidateFeatures, booster: Any, llm_ranker: Any = None, twin: Any = None,
                 sources: CandidateSources | None = None) -> None:
        self.features, self.booster, self._llm_ranker, self.twin, self.sources = (features, booster, llm_ranker,
                                                                                   twin, sources)
        self.batch_size = int(getattr(llm_ranker, "batch_size", 512))
        self.mode = "verbalizer+stacked" if llm_ranker is not None else "features"
        self.weight = 1.0 if llm_ranker is not None else 0.0  # 0: the LLM is not consulted
        self._failed = 0
        self._lock = threading.Lock()

    @property
    def llm_ranker(self) -> Any:
        return self._llm_ranker

    @property
    def components(self) -> tuple[str, ...]:
        return (TREES, LLM) if self._llm_ranker is not None else (TREES,)

    @property
    def label(self) -> str:
        text = "trees over LLM scores" if self._llm_ranker is not None else "trees"
        if self.sources is not None:
            text += " (candidates: " + " + ".join(f"{n} {c}" for n, c in self.sources.counts.items()) + ")"
        return text

    @property
    def failed_users(self) -> int:
        return self._failed + int(getattr(self._llm_ranker, "failed_users", 0))

    def without_llm(self) -> StackedRanker | None:
        """The twin: the same trees fitted without the LLM features (None when the run has none)."""
        if self.twin is None:
            return None
        return StackedRanker(self.features, self.twin, None, None, self.sources)

    def base_matrix(self, histories: Sequence[np.ndarray], candidates: np.ndarray, scores: np.ndarray,
                    users: np.ndarray | None) -> np.ndarray:
        """(B, K, F) the features without the LLM's: candidate features + source features."""
        X = self.features.transform(list(histories), candidates, scores, users)
        if self.sources is not None:
            X = np.concatenate([X, self.sources.describe(histories, candidates, users)], axis=2)
        return X

    def rank(self, histories: Sequence[np.ndarray], profiles: Sequence[str | None], candidates: np.ndarray,
             scores: np.ndarray | None = None, users: np.ndarray | None = None, *, weight: float | None = None,
             ) -> RankResult:
        """The trees' order over every feature; a row whose LLM scores fail is ordered by the twin (the same trees
        without LLM features) with ``allow_fallback`` on a backend failure (without it the error stops the call)."""
        t0 = time.perf_counter()
        s = np.zeros(candidates.shape, np.float32) if scores is None else scores
        X = self.base_matrix(histories, candidates, s, users)
        notes: list[str] = []
        lp = np.full(candidates.shape, np.nan, np.float32)  # not asked
        failed = np.zeros(len(histories), bool)
        if self._llm_ranker is None:
            full = break_ties(predict(self.booster, X))
        else:
            try:
                lp = self._llm_ranker.verbalizer_logprobs(histories, profiles, candidates)
            except (LLMUnavailable, LLMRequestFailed) as e:
                if not getattr(self._llm_ranker, "allow_fallback", False):
                    raise
                log.warning("LLM ranking failed (%s: %s); the trees without LLM features rank", type(e).__name__, e)
                notes.append(f"LLM failed: {type(e).__name__}: {e}: the order of the trees without LLM features "
                             "stands (--allow-fallback)")
            failed = ~np.isfinite(lp).all(axis=1)
            full = break_ties(predict(self.booster, np.concatenate([X, llm_features(lp)], axis=2)))
            if n_failed := note_failed_rows(failed, notes, "the order of the trees without LLM features"):
                with self._lock:
                    self._failed += n_failed
                if self.twin is not None:
                    full[failed] = break_ties(predict(self.twin, X[failed]))
        order, ordered = order_by(full, candidates)
        return RankResult(order, ordered, lp, failed, time.perf_counter() - t0, notes, candidate_scores=full,
                          components=self.components, fallback=(TREES,))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: Path, meta: dict[str, Any] | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.features.save(directory / "features")
        (directory / "trees.txt").write_text(self.booster.model_to_string())
        if self.twin is not None:
            (directory / "trees_without_llm.txt").write_text(self.twin.model_to_string())
        (directory / "stacked.json").write_text(json.dumps(
            {"llm_features": self._llm_ranker is not None, "twin": self.twin is not None, **(meta or {})}, indent=1))

    @classmethod
    def load(cls, directory: Path, llm_ranker: Any = None, sources: CandidateSources | None = None,
             ) -> StackedRanker:
        require_lightgbm()
        directory = Path(directory)
        meta = read_json(directory / "stacked.json")
        booster = load_booster(directory / "trees.txt")
        twin = (load_booster(directory / "trees_without_llm.txt")
                if (directory / "trees_without_llm.txt").is_file() else None)
        if not meta.get("llm_features", False):
            llm_ranker = None
        elif llm_ranker is None:
            raise PalrError(f"{directory}: this ranker reads the LLM's scores; load it with the run's LLM")
        return cls(CandidateFeatures.load(directory / "features"), booster, llm_ranker, twin, sources)


def predict(booster: Any, X: np.ndarray) -> np.ndarray:
    B, K, F = X.shape
    return booster.predict(X.reshape(-1, F), num_iteration=booster.best_iteration or None).reshape(B, K)


def fit_stacked(split: Split, valid_cands: tuple[np.ndarray, np.ndarray], cfg: FeatureRankerConfig, *,
                fit_users: np.ndarray, held_out: np.ndarray, features: CandidateFeatures,
                sources: CandidateSources | None = None, source_feats: np.ndarray | None = None,
                llm_lp: np.ndarray | None = None, llm_ranker: Any = None) -> tuple[StackedRanker, dict[str, Any]]:
    """The stacked ranker and its twin without LLM features, both fitted on the validation lists of
    ``fit_users`` (those with the target among the candidates), stopped on ``held_out`` users'.

    ``source_feats`` (U, K, 3S) and ``llm_lp`` (U, K): rows = users (row u = user u; only fit and held-out rows are
    read). The caller guarantees the LLM never trained on the validation targets of ``fit_users``
    (:func:`users_with_seen_valid_targets`). Returns the ranker and held-out metrics of both.
    """
    t0 = time.perf_counter()
    cands, scores = valid_cands
    targets = split.valid_targets
    rows, lab = labelled(cands, targets)
    fit_l, hold_l = np.intersect1d(fit_users, rows), np.intersect1d(held_out, rows)
    if len(fit_l) < 2 or len(hold_l) < 1:
        raise PalrError(f"too few validation users with the target among the candidates to fit the stacked ranker "
                        f"({len(fit_l)} to fit, {len(hold_l)} held out)")
    order = np.concatenate([fit_l, held_out])
    X = feature_lists(features, split, cands, scores, order)
    names = list(features.names)
    if sources is not None and source_feats is not None:
        X = np.concatenate([X, source_feats[order]], axis=2)
        names += sources.feature_names
    in_hold = np.isin(held_out, hold_l)
    Xf, Xh = X[:len(fit_l)], X[len(fit_l):]
    twin = fit_trees(Xf, lab[fit_l], Xh[in_hold], lab[hold_l], cfg, names)
    retr = positional_ranks(-np.arange(cands.shape[1], dtype=np.float64)[None].repeat(len(held_out), 0),
                            cands[held_out], targets[held_out])
    twin_pred = break_ties(predict(twin, Xh))
    metrics: dict[str, Any] = {
        "fit_users": len(fit_users), "fit_lists": len(fit_l), "holdout_users": len(held_out),
        "holdout_ndcg@10_retriever": ndcg(retr, 10),
        "holdout_ndcg@10_without_llm": ndcg(positional_ranks(twin_pred, cands[held_out], targets[held_out]), 10),
        "rounds_without_llm": int(twin.best_iteration or twin.current_iteration()),
        "features": names}
    if llm_lp is None:
        metrics["seconds"] = round(time.perf_counter() - t0, 2)
        return StackedRanker(features, twin, None, None, sources), metrics
    L = llm_features(llm_lp[order])
    Xf2, Xh2 = np.concatenate([Xf, L[:len(fit_l)]], axis=2), np.concatenate([Xh, L[len(fit_l):]], axis=2)
    booster = fit_trees(Xf2, lab[fit_l], Xh2[in_hold], lab[hold_l], cfg, names + LLM_FEATURES)
    pred = break_ties(predict(booster, Xh2))
    llm_alone = positional_ranks(np.where(np.isfinite(llm_lp[held_out]), llm_lp[held_out], -1e9), cands[held_out],
                                 targets[held_out])
    imp = dict(zip(names + LLM_FEATURES, booster.feature_importance("gain").round(1).tolist()))
    metrics.update({"holdout_ndcg@10": ndcg(positional_ranks(pred, cands[held_out], targets[held_out]), 10),
                    "holdout_ndcg@10_llm": ndcg(llm_alone, 10),
                    "rounds": int(booster.best_iteration or booster.current_iteration()),
                    "llm_feature_gain": {k: imp[k] for k in LLM_FEATURES},
                    "seconds": round(time.perf_counter() - t0, 2)})
    log.info("stacked ranker: held-out NDCG@10 %.4f (without LLM features %.4f, retriever %.4f)",
             metrics["holdout_ndcg@10"], metrics["holdout_ndcg@10_without_llm"], metrics["holdout_ndcg@10_retriever"])
    return StackedRanker(features, booster, llm_ranker, twin, sources), metrics


def users_with_seen_valid_targets(examples: Sequence[Any], split: Split) -> np.ndarray:
    """Users whose validation item is a target, or in the history, of some fine-tuning example of theirs (the LLM
    learned it; item-swap augmentation can move it into the history): they never fit the stacked ranker."""
    seen = {int(e.user) for e in examples
            if int(split.valid_targets[int(e.user)]) in {int(t) for t in e.targets}
            or int(split.valid_targets[int(e.user)]) in {int(h) for h in e.history}}
    return np.array(sorted(seen), np.int64)


def stacked_lists(split: Split, users: np.ndarray, cands: np.ndarray, llm_ranker: Any, profiles: Any,
                  batch: int = 256) -> np.ndarray:
    """(U, K) the LLM's validation log-probs for ``users`` (other rows NaN): history = the training sequence."""
    out = np.full(cands.shape, np.nan, np.float32)
    for s in range(0, len(users), batch):
        u = users[s:s + batch]
        hist = [split.train[i] for i in u]
        out[u] = llm_ranker.verbalizer_logprobs(hist, profiles.texts(hist, u), cands[u])
    return out


__all__ = ["LLM_FEATURES", "NO_LLM_LABEL", "StackedRanker", "fit_stacked", "llm_features", "stacked_lists",
           "users_with_seen_valid_targets"]
