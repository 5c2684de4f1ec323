"""The feature re-ranker: gradient-boosted trees (LightGBM, lambdarank) over :mod:`palr.rank.features`.

Trained on **genuine candidates**: each validation user's retriever top-K for the validation target, with
the retriever fitted on the training split only (so the validation targets were not in its training
data, as the test targets are not). A seeded share of the validation users (``holdout``) is held out:
the trees never train on it; it stops the boosting (best NDCG@10 there) and is where PALR's stacked
ranker later chooses its settings. The test split is never used.

``palr finetune --run RETRIEVER_RUN --ranker features --out F`` writes a PALR run (``ranking.json``:
``"ranker": "features"``) that ``palr evaluate --run F`` scores like any PALR run. ``extra`` features
(the LLM's scores: :mod:`palr.rank.stacked`) ride on the same code.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from palr.core.errors import PalrError, RunError
from palr.core.metrics import ndcg
from palr.data.dataset import Split
from palr.rank.features import CandidateFeatures
from palr.rank.llm_ranker import order_by, positional_ranks
from palr.rank.protocol import TREES, RankResult
from palr.runs.safety import read_text

log = logging.getLogger(__name__)


@dataclass
class FeatureRankerConfig:
    """Every knob of the feature re-ranker (saved in the run's config.json)."""

    n_candidates: int = 50
    holdout: float = 0.2  # share of validation users held out (early stopping, later fusion choices)
    rounds: int = 1000  # boosting rounds at most (early stopping picks fewer)
    early_stopping: int = 50
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.9
    text_encoder: str = "auto"  # "auto" (MiniLM if the text extra is installed, else TF-IDF), "minilm", "tfidf"
    threads: int = 2
    seed: int = 0


def require_lightgbm() -> Any:
    try:
        import lightgbm
    except ImportError:
        raise PalrError("the feature ranker needs LightGBM: pip install 'palr[rank]' (or fine-tune with "
                        "--no-features)") from None
    return lightgbm


def split_users(n_users: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit users, held-out users), a seeded partition of the validation users (both sorted)."""
    if not 0 < holdout < 1:
        raise PalrError(f"holdout must be in (0, 1), got {holdout}")
    perm = np.random.default_rng(seed + 11).permutation(n_users)
    k = max(1, round(holdout * n_users))
    return np.sort(perm[k:]), np.sort(perm[:k])


def labelled(cands: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows with the target among the candidates, (B, K) 0/1 labels): other lists teach a ranker nothing."""
    lab = (cands == targets[:, None]).astype(np.float32)
    return np.flatnonzero(lab.sum(axis=1) > 0), lab


def fit_trees(X: np.ndarray, y: np.ndarray, Xh: np.ndarray, yh: np.ndarray, cfg: FeatureRankerConfig,
              names: list[str]) -> Any:
    """LightGBM lambdarank on (U, K, F) lists; early stopping on the held-out lists' NDCG@10."""
    lgb = require_lightgbm()
    K = X.shape[1]
    params = {"objective": "lambdarank", "metric": "ndcg", "eval_at": [10], "learning_rate": cfg.learning_rate,
              "num_leaves": cfg.num_leaves, "min_data_in_leaf": cfg.min_data_in_leaf,
              "feature_fraction": cfg.feature_fraction, "bagging_seed": cfg.seed, "feature_fraction_seed": cfg.seed,
              "seed": cfg.seed, "deterministic": True, "num_threads": cfg.threads, "verbosity": -1,
              "lambdarank_truncation_level": 20}
    train = lgb.Dataset(X.reshape(-1, X.shape[2]), y.reshape(-1), group=[K] * len(X), feature_name=names,
                        free_raw_data=True)
    hold = lgb.Dataset(Xh.reshape(-1, Xh.shape[2]), yh.reshape(-1), group=[K] * len(Xh), reference=train)
    booster = lgb.train(params, train, cfg.rounds, valid_sets=[hold], valid_names=["holdout"],
                        callbacks=[lgb.early_stopping(cfg.early_stopping, verbose=False)])
    return booster


def break_ties(pred: np.ndarray) -> np.ndarray:
    """Trees give equal scores to candidates in the same leaves: such ties go to the retriever's order
    (a step of 1e-9 per rank, far below any split of the trees' outputs), so that the pessimistic
    metrics and the written order agree."""
    K = pred.shape[1]
    return pred.astype(np.float64) + 1e-9 * np.arange(K, 0, -1, dtype=np.float64)[None, :]


class FeatureRanker:
    """Scores candidate lists with the fitted trees; implements :class:`palr.rank.protocol.Ranker` (no LLM)."""

    mode = "features"
    fusion = "trees"  # no LLM: the trees' score orders the candidates (``weight`` is not used)
    weight = 0.0
    llm_ranker = None
    failed_users = 0
    components = (TREES,)
    label = TREES

    def __init__(self, features: CandidateFeatures, booster: Any, batch_size: int = 512) -> None:
        self.features, self.booster, self.batch_size = features, booster, batch_size

    def predict(self, X: np.ndarray) -> np.ndarray:
        B, K, F = X.shape
        return self.booster.predict(X.reshape(-1, F), num_iteration=self.booster.best_iteration or None).reshape(B, K)

    def scores(self, histories: list[np.ndarray], candidates: np.ndarray, scores: np.ndarray,
               users: np.ndarray | None = None, extra: np.ndarray | None = None) -> np.ndarray:
        X = self.features.transform(histories, candidates, scores, users)
        if extra is not None:
            X = np.concatenate([X, extra.astype(np.float32)], axis=2)
        return self.predict(X)

    def rank(self, histories: Sequence[np.ndarray], profiles: Any, candidates: np.ndarray,
             scores: np.ndarray | None = None, users: np.ndarray | None = None, *, weight: float | None = None,
             ) -> RankResult:
        """The trees' order (ties in the retriever's order); ``weight`` is not used (no LLM)."""
        t0 = time.perf_counter()
        s = np.zeros(candidates.shape, np.float32) if scores is None else scores
        fused = break_ties(self.scores(list(histories), candidates, s, users))
        order, ordered = order_by(fused, candidates)
        return RankResult(order, ordered, np.full(candidates.shape, np.nan, np.float32),
                          np.zeros(len(histories), bool), time.perf_counter() - t0, candidate_scores=fused,
                          components=self.components, fallback=self.components)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self.features.save(directory / "features")
        (directory / "trees.txt").write_text(self.booster.model_to_string())

    @classmethod
    def load(cls, directory: Path) -> FeatureRanker:
        require_lightgbm()
        directory = Path(directory)
        path = directory / "trees.txt"
        booster = load_booster(path)
        try:
            features = CandidateFeatures.load(directory / "features")
        except (KeyError, ValueError, TypeError, IndexError) as e:  # parsed, but not what was written
            raise RunError(f"{directory / 'features'}: damaged feature files ({type(e).__name__}: "
                           f"{str(e)[:200]})") from None
        if booster.num_feature() < len(features.names):
            raise RunError(f"{path} does not match {directory / 'features'}: {booster.num_feature()} features in "
                           f"the trees, {len(features.names)} computed")
        return cls(features, booster)


# ---------------------------------------------------------------------------- a model file checked before LightGBM
def load_booster(path: Path) -> Any:
    """A LightGBM booster from a run's text model, checked first (:func:`check_model_text`): a damaged file is
    one line naming it, never an aborted process."""
    lgb = require_lightgbm()
    text = read_text(path)
    check_model_text(text, path)  # LightGBM aborts the process on a damaged model: never hand it one
    try:
        return lgb.Booster(model_str=text)
    except lgb.basic.LightGBMError as e:
        raise RunError(f"{path}: damaged LightGBM model ({' '.join(str(e).split())[:200]})") from None


def check_model_text(text: str, path: str | Path = "trees.txt") -> None:
    """Refuse a LightGBM text model that is truncated or damaged, before LightGBM parses it.

    LightGBM parses trees in C++ threads and terminates the whole process on a malformed one (``terminate
    called...``, exit 134), and a damaged child pointer can make prediction loop forever. So the text is checked
    as LightGBM writes it: the header, every tree at the offset ``tree_sizes`` gives, each tree's arrays (count and
    number syntax for ``num_leaves``), its shape (every node a child exactly once), ``end of trees`` and a complete
    ``parameters:`` section. :class:`RunError` names the file and the problem."""
    problem = _model_text_problem(text)
    if problem is not None:
        raise RunError(f"{path}: damaged LightGBM model ({problem}); retrain the feature ranker")


_NUM = re.compile(r"^[-+]?((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|nan)$", re.IGNORECASE)
_INT = re.compile(r"^-?\d+$")
# per tree: key -> how many values (in terms of n = num_leaves), integer or not
_TREE_ARRAYS = {"split_feature": (-1, True), "split_gain": (-1, False), "threshold": (-1, False),
                "decision_type": (-1, True), "left_child": (-1, True), "right_child": (-1, True),
                "leaf_value": (0, False), "leaf_weight": (0, False), "leaf_count": (0, True),
                "internal_value": (-1, False), "internal_weight": (-1, False), "internal_count": (-1, True)}


def _model_text_problem(text: str) -> str | None:
    """What is wrong with a LightGBM text model, or None (see :func:`check_model_text`)."""
    if not text.startswith("tree\n"):
        return "not a LightGBM text model (no 'tree' header)"
    head_end = text.find("\n\n")
    if head_end < 0:
        return "truncated header"
    header = dict(l.split("=", 1) for l in text[:head_end].splitlines()[1:] if "=" in l)
    for k in ("version", "num_class", "num_tree_per_iteration", "max_feature_idx", "tree_sizes", "feature_names",
              "feature_infos"):
        if k not in header:
            return f"no {k} in the header"
    if not all(_INT.match(x) for x in header["tree_sizes"].split()) or not all(
            _INT.match(header[k]) for k in ("num_class", "num_tree_per_iteration", "max_feature_idx")):
        return "damaged header"
    sizes = [int(x) for x in header["tree_sizes"].split()]
    max_f = int(header["max_feature_idx"])
    if int(header["num_class"]) < 1 or int(header["num_tree_per_iteration"]) < 1 or max_f < 0:
        return "damaged header"
    if len(header["feature_names"].split()) != max_f + 1 or len(header["feature_infos"].split()) != max_f + 1:
        return "damaged header (feature names or infos)"
    p = head_end + 2
    for i, size in enumerate(sizes):
        block = text[p:p + size]
        if len(block) != size or not block.startswith(f"Tree={i}\n"):
            return f"tree {i} truncated or damaged"
        err = _tree_problem(block, max_f)
        if err:
            return f"tree {i}: {err}"
        p += size
    rest = text[p:].lstrip("\n")
    if not rest.startswith("end of trees"):
        return "no 'end of trees' after the last tree (truncated)"
    i, j = rest.find("\nparameters:\n"), rest.find("\nend of parameters")
    if i < 0 or j < i:
        return "truncated after the trees (no complete 'parameters:' section)"
    for line in rest[i + len("\nparameters:\n"):j].splitlines():
        if not (line.startswith("[") and line.endswith("]") and ": " in line):
            return "damaged 'parameters:' section"
    return None


def _tree_problem(block: str, max_f: int) -> str | None:
    lines = [l for l in block.splitlines()[1:] if l]
    if not all("=" in l for l in lines):
        return "a line without '='"
    kv = dict(l.split("=", 1) for l in lines)
    if len(kv) != len(lines):
        return "a repeated field"
    if not _INT.match(kv.get("num_leaves", "")) or kv.get("num_cat") != "0":
        return "no num_leaves, or num_cat is not 0"
    if kv.get("is_linear", "0") != "0" or not _NUM.match(kv.get("shrinkage", "1")):
        return "is_linear or shrinkage damaged"
    n = int(kv["num_leaves"])
    if n < 1:
        return "num_leaves < 1"
    for key, (extra, integer) in _TREE_ARRAYS.items():
        want = n + extra
        if want == 0 and key not in kv:
            continue
        vals = kv.get(key, "").split()
        if len(vals) != want or not all((_INT if integer else _NUM).match(v) for v in vals):
            return f"{key} damaged"
        if key == "split_feature" and any(not 0 <= int(v) <= max_f for v in vals):
            return "split_feature out of range"
        if key in ("left_child", "right_child") and any(not -n <= int(v) < n - 1 for v in vals):
            return f"{key} out of range"
    if n > 1:  # a proper tree: every internal node but the root and every leaf is a child exactly once
        children = [int(v) for k in ("left_child", "right_child") for v in kv[k].split()]
        if sorted(children) != sorted([*range(1, n - 1), *range(-n, 0)]):
            return "damaged structure (children)"
    unknown = set(kv) - set(_TREE_ARRAYS) - {"num_leaves", "num_cat", "is_linear", "shrinkage"}
    if unknown:
        return f"unknown field {min(unknown)}"
    return None



def feature_lists(features: CandidateFeatures, split: Split, cands: np.ndarray, scores: np.ndarray,
                  users: np.ndarray, batch: int = 1024) -> np.ndarray:
    """(len(users), K, F) features of the validation lists of ``users`` (history = the training sequence)."""
    out = []
    for s in range(0, len(users), batch):
        u = users[s:s + batch]
        out.append(features.transform([split.train[i] for i in u], cands[u], scores[u], u))
    return np.concatenate(out) if out else np.zeros((0, cands.shape[1], len(features.names)), np.float32)


def fit_feature_ranker(split: Split, valid_cands: tuple[np.ndarray, np.ndarray], cfg: FeatureRankerConfig,
                       extra: np.ndarray | None = None, extra_names: list[str] | None = None,
                       features: CandidateFeatures | None = None) -> tuple[FeatureRanker, dict[str, Any]]:
    """Fit on the fit share of validation users, stop early on the held-out share.

    ``extra``: (U, K, E) more features for every validation list (row u = user u), e.g. the LLM's scores.
    Returns the ranker and {"holdout_ndcg@10": trees, "holdout_ndcg@10_retriever": ..., "rounds": ...}.
    """

    t0 = time.perf_counter()
    cands, scores = valid_cands
    targets = split.valid_targets
    feats = features or CandidateFeatures().fit(split, cfg.text_encoder, cfg.seed)
    fit_u, hold_u = split_users(len(split.train), cfg.holdout, cfg.seed)
    rows, lab = labelled(cands, targets)
    fit_l, hold_l = np.intersect1d(fit_u, rows), np.intersect1d(hold_u, rows)
    X = feature_lists(feats, split, cands, scores, np.concatenate([fit_l, hold_u]))
    if extra is not None:
        X = np.concatenate([X, extra[np.concatenate([fit_l, hold_u])].astype(np.float32)], axis=2)
    names = feats.names + list(extra_names or [])
    Xf, Xh_all = X[:len(fit_l)], X[len(fit_l):]
    in_hold = np.isin(hold_u, hold_l)
    if len(fit_l) < 2 or in_hold.sum() < 1:
        raise PalrError(f"too few validation users with the target among the candidates to fit the feature ranker "
                        f"({len(fit_l)} to fit, {int(in_hold.sum())} held out)")
    booster = fit_trees(Xf, lab[fit_l], Xh_all[in_hold], lab[hold_l], cfg, names)
    ranker = FeatureRanker(feats, booster)
    pred = break_ties(ranker.predict(Xh_all))
    ranks = positional_ranks(pred, cands[hold_u], targets[hold_u])
    retr = positional_ranks(-np.arange(cands.shape[1], dtype=np.float64)[None].repeat(len(hold_u), 0),
                            cands[hold_u], targets[hold_u])
    imp = dict(zip(names, booster.feature_importance("gain").round(1).tolist()))
    metrics = {"holdout_users": len(hold_u), "fit_users": len(fit_u), "fit_lists": len(fit_l),
               "holdout_ndcg@10": ndcg(ranks, 10), "holdout_ndcg@10_retriever": ndcg(retr, 10),
               "rounds": int(booster.best_iteration or booster.current_iteration()),
               "text_encoder": feats.text_encoder, "feature_gain": imp, "seconds": round(time.perf_counter() - t0, 2)}
    log.info("feature ranker: held-out NDCG@10 %.4f (retriever %.4f), %d rounds, %.1f s", metrics["holdout_ndcg@10"],
             metrics["holdout_ndcg@10_retriever"], metrics["rounds"], metrics["seconds"])
    return ranker, metrics
