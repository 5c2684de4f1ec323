"""Golden values, worked out by hand (in the comments), for the small functions that decide a ranking or a
reported figure: the tie keys of the full ranking, the paired bootstrap, and the fusion helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from palr.core.topk import ranks_of_targets, tie_keys, top_k
from palr.evaluate.stats import paired_bootstrap
from palr.rank.fusion import choose_feature_weight, fuse_with_features
from palr.rank.llm_ranker import floor_missing, fuse
from palr.rank.trees import break_ties

LN2, LN3 = math.log(2), math.log(3)
M64 = 2**64 - 1


def splitmix64(x: int) -> int:
    """Vigna's SplitMix64 step on Python integers: the reference tie_keys is built from."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


# ---------------------------------------------------------------------------- tie_keys
def test_tie_keys_golden() -> None:
    # SplitMix64 with state 0 gives 0xE220A8397B1DCDAF: the published first output of the generator
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    # key(seed, user, item) = sm(sm(sm(seed) ^ user) ^ item): for (0, 0, 0) that is sm(sm(sm(0)))
    assert int(tie_keys(np.array(0), np.array(0), 0)) == splitmix64(splitmix64(splitmix64(0))) == 0x238275BC38FCBE91
    assert int(tie_keys(np.array(1), np.array(5), 0)) == splitmix64(splitmix64(splitmix64(0) ^ 1) ^ 5) == 0x5A2F46D741001585
    # seed 7, user 3, item 2, and a broadcast (users as a column, items as a row)
    assert int(tie_keys(np.array(3), np.array(2), 7)) == splitmix64(splitmix64(splitmix64(7) ^ 3) ^ 2)
    grid = tie_keys(np.array([[0], [1]]), np.arange(3), 0)
    assert grid.shape == (2, 3) and grid.dtype == np.uint64
    assert [[int(v) for v in row] for row in grid] == [
        [splitmix64(splitmix64(splitmix64(0) ^ u) ^ i) for i in range(3)] for u in range(2)]


def test_tied_scores_follow_the_keys_in_top_k_and_ranks() -> None:
    # four items with one score: top_k orders them by key, smallest first, and ranks_of_targets agrees
    scores = np.zeros((1, 4))
    keys = [splitmix64(splitmix64(splitmix64(0) ^ 0) ^ i) for i in range(4)]
    want = sorted(range(4), key=lambda i: keys[i])
    top, _ = top_k(scores, [np.array([], dtype=np.int64)], 4)
    assert top[0].tolist() == want
    for pos, item in enumerate(want, 1):
        assert ranks_of_targets(scores, np.array([item]))[0] == pos


# ---------------------------------------------------------------------------- paired bootstrap
def test_paired_bootstrap_golden() -> None:
    # 4 users: a = (1, 0, 1, 1), b = (0, 0, 1, 0): mean_a 3/4, mean_b 1/4, diff 1/2, ratio 3
    a, b = np.array([1.0, 0.0, 1.0, 1.0]), np.array([0.0, 0.0, 1.0, 0.0])
    c = paired_bootstrap(a, b, n_boot=2000, seed=0)
    assert (c.mean_a, c.mean_b, c.diff, c.ratio, c.n_users) == (0.75, 0.25, 0.5, 3.0, 4)
    # paired t-test on d = (1, 0, 0, 1): mean 1/2, sd sqrt(1/3), t = (1/2) / (sqrt(1/3) / 2) = sqrt(3), df 3.
    # For 3 degrees of freedom F(t) = 1/2 + (t / (sqrt(3) (1 + t^2/3)) + atan(t / sqrt(3))) / pi; at sqrt(3):
    # 1/2 + (1/2 + pi/4) / pi, so p = 2 (1 - F) = 1/2 - 1/pi = 0.18169...
    assert c.p_value == pytest.approx(0.5 - 1 / math.pi, abs=1e-12)
    # a resampled mean of d is (number of the two 1s drawn in 4 draws) / 4 ~ Binomial(4, 1/2) / 4: 0 and 1
    # each have probability 1/16 = 6.25% > 2.5%, so the 2.5% and 97.5% percentiles are exactly 0 and 1
    assert c.diff_ci95 == (0.0, 1.0)
    # the ratio's interval: the same resamples of users (numpy Generator, seed 0, one (2000, 4) draw of user
    # indices), replicates with no baseline hit left out, percentiles 2.5 and 97.5
    idx = np.random.default_rng(0).integers(0, 4, size=(2000, 4))
    ma, mb = a[idx].mean(axis=1), b[idx].mean(axis=1)
    ratios = ma[mb > 0] / mb[mb > 0]
    assert c.ratio_ci95 == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])))
    # a replicate's ratio is (draws of users 0, 2, 3) / (draws of user 2): from 4/4 = 1 (user 2 four times) to
    # 4/1 = 4 (user 2 once), so the interval lies in [1, 4], around the estimate 3
    assert 1.0 <= c.ratio_ci95[0] < 3.0 < c.ratio_ci95[1] <= 4.0
    assert paired_bootstrap(a, b, n_boot=2000, seed=0) == c  # the same seed, the same resamples


# ---------------------------------------------------------------------------- LLM score fusion
def test_floor_missing_golden() -> None:
    lp = np.array([[-1.0, -np.inf, -3.0],  # lowest scored -3: the missing one goes 30 below, -33
                   [np.nan, np.nan, np.nan],  # nothing scored: all 0 (the retriever's order stands)
                   [-2.0, 0.0, np.nan]])  # lowest scored -2: the missing one -32
    assert floor_missing(lp).tolist() == [[-1.0, -33.0, -3.0], [0.0, 0.0, 0.0], [-2.0, 0.0, -32.0]]
    assert floor_missing(lp, gap=5.0).tolist() == [[-1.0, -8.0, -3.0], [0.0, 0.0, 0.0], [-2.0, 0.0, -7.0]]


def test_fuse_golden() -> None:
    # LLM log-probs (0, 0, ln 2): softmax (1/4, 1/4, 1/2), log_softmax (-ln 4, -ln 4, -ln 2)
    llm = np.array([[0.0, 0.0, LN2]])
    # rank prior: -ln(position) = (0, -ln 2, -ln 3)
    assert fuse(llm, 0.0) == pytest.approx(np.array([[-2 * LN2, -2 * LN2, -LN2]]))
    # w = 1: (-ln 4, -ln 4 - ln 2, -ln 2 - ln 3) = -ln (4, 8, 6): candidate 0 first, then 2, then 1
    assert fuse(llm, 1.0) == pytest.approx(-np.log([[4.0, 8.0, 6.0]]))
    assert fuse(llm, 0.5) == pytest.approx(np.array([[-2 * LN2, -2 * LN2 - LN2 / 2, -LN2 - LN3 / 2]]))
    assert fuse(llm, math.inf).tolist() == [[0.0, -LN2, -LN3]]  # the retriever alone
    # score prior: the retriever's scores (ln 2, 0, NaN); NaN becomes (lowest finite) - 50 = -50, so the
    # prior is log_softmax(ln 2, 0, -50) = (ln 2/3, -ln 3, -50 - ln 3) (e^-50 is below the tolerance)
    scores = np.array([[LN2, 0.0, np.nan]])
    want = np.array([[-2 * LN2 + LN2 - LN3, -2 * LN2 - LN3, -LN2 - 50 - LN3]])
    assert fuse(llm, 1.0, scores, "score") == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------------------- feature ranker fusion
def test_break_ties_golden() -> None:
    # + 1e-9 * (K, K-1, ..., 1): equal scores keep the retriever's order, unequal ones are untouched
    got = break_ties(np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 2.0]], dtype=np.float32))
    assert got.dtype == np.float64
    assert got.tolist() == [[1 + 3e-9, 1 + 2e-9, 1 + 1e-9], [2 + 3e-9, 2e-9, 2 + 1e-9]]
    assert np.argsort(-got, axis=1, kind="stable").tolist() == [[0, 1, 2], [0, 2, 1]]


def test_fuse_with_features_golden() -> None:
    # trees (0.5, 0.5, 0) + 2 * log_softmax(0, 0, ln 2) = (0.5 - 4 ln 2, 0.5 - 4 ln 2, -2 ln 2), ties broken
    got = fuse_with_features(np.array([[0.5, 0.5, 0.0]]), np.array([[0.0, 0.0, LN2]]), 2.0)
    want = [[0.5 - 4 * LN2 + 3e-9, 0.5 - 4 * LN2 + 2e-9, -2 * LN2 + 1e-9]]
    assert got == pytest.approx(np.array(want), abs=1e-15)
    # -2 ln 2 = -1.386 beats 0.5 - 4 ln 2 = -2.273: the LLM's favourite goes first; the tie stays 0 before 1
    assert np.argsort(-got[0], kind="stable").tolist() == [2, 0, 1]


def test_choose_feature_weight_golden() -> None:
    candidates = np.array([[10, 11, 12], [20, 21, 22]])
    targets = np.array([12, 20])
    llm = np.array([[0.0, 0.0, LN2], [0.0, 0.0, LN2]])  # log_softmax (-ln 4, -ln 4, -ln 2): favours column 2
    # user 0: trees all 0, target in column 2. w = 0: the tie goes to retriever order, rank 3, NDCG 1/log2(4) = 1/2;
    #   w > 0: the LLM puts it first, NDCG 1.
    # user 1: trees (1, 0, 0), target in column 0. w = 1: (1 - 1.386, -1.386, -0.693): first, NDCG 1;
    #   w = 2: (1 - 2.773, -2.773, -1.386): second, NDCG 1/log2(3) = 0.6309.
    trees = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    w, table = choose_feature_weight(trees, llm, candidates, targets, grid=(0.0, 1.0, 2.0))
    assert w == 1.0
    assert table == pytest.approx({"0.0": 0.75, "1.0": 1.0, "2.0": (1 + 1 / math.log2(3)) / 2})
    # user 1's trees (3, 0, 0): w = 2 gives (3 - 2.773, ...), still first: 1 and 2 tie at 1.0, the smaller wins
    trees[1, 0] = 3.0
    w, table = choose_feature_weight(trees, llm, candidates, targets, grid=(2.0, 1.0, 0.0))
    assert w == 1.0 and table == pytest.approx({"2.0": 1.0, "1.0": 1.0, "0.0": 0.75})
