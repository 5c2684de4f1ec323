"""Per-user metrics, the paired bootstrap and the paired test against hand-computed cases; seed summaries."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from palr.core.metrics import metrics_from_ranks, per_user_metrics
from palr.evaluate.stats import Comparison, compare_metrics, format_ratio, paired_bootstrap, summarize_seeds


def test_per_user_metrics_hand_computed() -> None:
    m = per_user_metrics(np.array([1, 3, 11]), ks=(10,))
    assert set(m) == {"HR@10", "NDCG@10", "MRR@10"}
    np.testing.assert_allclose(m["HR@10"], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(m["NDCG@10"], [1.0, 0.5, 0.0])  # 1/log2(4) = 0.5
    np.testing.assert_allclose(m["MRR@10"], [1.0, 1 / 3, 0.0])
    # the averaged metrics are the means of the per-user ones (one definition)
    avg = metrics_from_ranks(np.array([1, 3, 11]), ks=(10,))
    assert avg["NDCG@10"] == pytest.approx(0.5) and avg["users"] == 3


def test_paired_t_p_values_hand_computed() -> None:
    # n = 2 (df 1, Cauchy): d = [1, 0.5], mean 0.75, sd 0.35355, t = 3, p = 1 - (2/pi) atan(3)
    c = paired_bootstrap(np.array([1.0, 1.0]), np.array([0.0, 0.5]), n_boot=200)
    assert c.p_value == pytest.approx(1 - 2 / math.pi * math.atan(3.0), abs=1e-9)
    # n = 3 (df 2: two-sided p = 1 - t / sqrt(2 + t^2)): d = [1, 1, 0], mean 2/3, se 1/3, t = 2
    c = paired_bootstrap(np.array([1.0, 1.0, 0.0]), np.array([0.0, 0.0, 0.0]), n_boot=200)
    assert c.p_value == pytest.approx(1 - 2 / math.sqrt(6), abs=1e-9)
    assert c.mean_a == pytest.approx(2 / 3) and c.mean_b == 0.0 and c.diff == pytest.approx(2 / 3)
    assert math.isnan(c.ratio) and c.to_dict()["ratio"] is None and c.to_dict()["ratio_ci95"] == [None, None]
    # no difference at all: p = 1; a constant non-zero difference: p = 0
    assert paired_bootstrap(np.ones(5), np.ones(5)).p_value == 1.0
    assert paired_bootstrap(np.ones(5), np.zeros(5) + 0.5).p_value == 0.0


def test_bootstrap_intervals_hand_computed() -> None:
    # a constant per-user difference and a constant ratio: every replicate gives the same value
    b = np.array([0.2, 0.4, 0.6, 0.8])
    c = paired_bootstrap(b * 2, b, n_boot=500, seed=3)
    assert c.ratio == pytest.approx(2.0) and c.ratio_ci95 == pytest.approx((2.0, 2.0))
    c = paired_bootstrap(b + 0.1, b, n_boot=500)
    assert c.diff == pytest.approx(0.1) and c.diff_ci95 == pytest.approx((0.1, 0.1))
    # two users, d = [1, 0]: a replicate's mean difference is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% percentiles are 0 and 1
    c = paired_bootstrap(np.array([1.0, 0.0]), np.array([0.0, 0.0]), n_boot=4000)
    assert c.diff_ci95 == (0.0, 1.0) and c.diff == 0.5 and c.n_users == 2


def test_bootstrap_interval_matches_the_normal_one_for_many_users() -> None:
    rng = np.random.default_rng(0)
    b = rng.random(5000)
    a = b + rng.normal(0.01, 0.2, size=5000)
    c = paired_bootstrap(a, b, n_boot=2000, seed=1)
    d = a - b
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    lo, hi = c.diff_ci95
    assert lo < c.diff < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert c.diff - lo == pytest.approx(half, rel=0.15) and hi - c.diff == pytest.approx(half, rel=0.15)
    # the ratio's interval brackets it and agrees in sign with the difference's
    assert c.ratio_ci95[0] < c.ratio < c.ratio_ci95[1]
    assert (c.ratio_ci95[0] > 1) == (lo > 0)


def test_seeded_reproducible_and_shared_resamples() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.random(300), rng.random(300)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7).diff_ci95 != paired_bootstrap(a, b, seed=8).diff_ci95
    many = compare_metrics({"x": a, "y": b}, {"x": b, "y": a}, seed=7)
    one = paired_bootstrap(a, b, seed=7)  # the same resamples (up to float rounding in the sums)
    assert many["x"].diff_ci95 == pytest.approx(one.diff_ci95, abs=1e-12)
    assert many["x"].ratio_ci95 == pytest.approx(one.ratio_ci95, abs=1e-12)
    assert many["x"].p_value == one.p_value
    assert many["y"].diff == pytest.approx(-many["x"].diff)


def test_comparison_to_dict_is_json() -> None:
    c = paired_bootstrap(np.array([1.0, 0.0, 1.0, 1.0]), np.array([0.0, 0.0, 1.0, 0.0]), n_boot=100)
    doc = json.loads(json.dumps(c.to_dict()))
    assert set(doc) == {"mean_a", "mean_b", "diff", "diff_ci95", "ratio", "ratio_ci95", "p_value", "n_users"}
    assert doc["ratio"] == pytest.approx(3.0) and len(doc["diff_ci95"]) == 2
    assert isinstance(c, Comparison) and format_ratio(c).startswith("3.000x [")


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        paired_bootstrap(np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        summarize_seeds([])


def test_fast_for_beauty_sized_comparisons() -> None:
    rng = np.random.default_rng(0)
    ranks_a, ranks_b = rng.integers(1, 200, 22_363), rng.integers(1, 200, 22_363)
    t0 = time.process_time()  # CPU time: the wall clock of a shared machine says little (about 1.6 s measured)
    out = compare_metrics(per_user_metrics(ranks_a), per_user_metrics(ranks_b), n_boot=2000)
    assert time.process_time() - t0 < 10.0 and len(out) == 9


def test_summarize_seeds_hand_computed() -> None:
    s = summarize_seeds([0.1, 0.2, 0.3])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.2) and s["sd"] == pytest.approx(0.1)
    assert summarize_seeds([0.5]) == {"mean": 0.5, "sd": 0.0, "n": 1}
