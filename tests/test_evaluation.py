"""Metrics against hand-computed values, seeded random ties (rank = position in the written list), the
pessimistic bound, history exclusion, exact top-k, batch == single,
and `palr evaluate` end to end on a synthetic CSV."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from typer.testing import CliRunner

from palr.cli.main import app
from palr.core.metrics import hit_rate, metrics_from_ranks, mrr, ndcg, recall_of_candidates
from palr.core.topk import history_mask, pessimistic_ranks, ranks_of_targets, tie_keys, top_k
from palr.data import Split, load_dataset
from palr.data.synthetic import synthetic_raw
from palr.evaluate.retrievers import evaluate_retriever, results_table
from palr.retrieval.base import make_retriever


# ---------------------------------------------------------------------------- metrics (hand-computed)
def test_metrics_hand_computed() -> None:
    ranks = np.array([1, 2, 5, 11])
    assert hit_rate(ranks, 10) == pytest.approx(0.75)
    # (1/log2(2) + 1/log2(3) + 1/log2(6) + 0) / 4
    assert ndcg(ranks, 10) == pytest.approx((1.0 + 0.6309297535714574 + 0.38685280723454163) / 4)
    assert mrr(ranks, 10) == pytest.approx((1.0 + 0.5 + 0.2) / 4)
    assert hit_rate(ranks, 1) == pytest.approx(0.25)
    assert ndcg(ranks, 2) == pytest.approx((1.0 + 0.6309297535714574) / 4)
    assert mrr(ranks, 2) == pytest.approx(0.375)
    # rank == k counts, rank == k + 1 does not
    assert hit_rate(np.array([10, 11]), 10) == 0.5
    assert ndcg(np.array([10]), 10) == pytest.approx(1 / math.log2(11))
    m = metrics_from_ranks(ranks, ks=(5, 10))
    assert set(m) == {"HR@5", "NDCG@5", "MRR@5", "HR@10", "NDCG@10", "MRR@10", "users"}
    assert m["users"] == 4 and m["HR@5"] == pytest.approx(0.75) and m["MRR@5"] == pytest.approx(0.425)
    assert hit_rate(np.array([]), 10) == 0.0 and ndcg(np.array([]), 10) == 0.0 and mrr(np.array([]), 10) == 0.0


def test_pessimistic_ranks_hand_computed() -> None:
    scores = np.array([[3.0, 1.0, 3.0, 2.0, 3.0],
                       [0.0, 9.0, 1.0, 1.0, 0.5]])
    # row 0: target 0 ties with items 2 and 4 -> rank 3; row 1: target 2 ties with 3, item 1 is above -> 3
    assert pessimistic_ranks(scores, np.array([0, 2])).tolist() == [3, 3]
    exclude = np.zeros_like(scores, dtype=bool)
    exclude[0, 2] = True  # a history item tied with the target no longer counts
    exclude[1, 1] = True  # the history item above the target no longer counts
    assert pessimistic_ranks(scores, np.array([0, 2]), exclude).tolist() == [2, 2]


def test_history_excluded_from_ranking() -> None:
    scores = np.array([[9.0, 8.0, 7.0, 1.0, 0.0]])
    hist = [np.array([0, 1, 2])]
    assert pessimistic_ranks(scores, np.array([3])).tolist() == [4]
    assert pessimistic_ranks(scores, np.array([3]), history_mask(hist, 5)).tolist() == [1]


def test_nan_scores_are_worst() -> None:
    scores = np.array([[np.nan, 0.0, -5.0, np.nan]])
    # a NaN target is ranked below every real score, and ties (pessimistically) with the other NaN
    assert pessimistic_ranks(scores, np.array([0])).tolist() == [4]
    # a NaN competitor never beats a real target, however low
    assert pessimistic_ranks(scores, np.array([2])).tolist() == [2]
    idx, _ = top_k(scores, [np.array([], dtype=np.int64)], 4)
    assert idx.tolist() == [[1, 2, 0, 3]]


def test_constant_model_is_not_rewarded() -> None:
    """A constant-score model ranks each target last among the non-excluded items: HR@10 ~ 10/N, never 1."""
    rng = np.random.default_rng(0)
    n_users, n_items = 300, 3_000
    histories = [rng.choice(n_items, size=int(rng.integers(5, 200)), replace=False) for _ in range(n_users)]
    targets = np.array([rng.choice(np.setdiff1d(np.arange(n_items), h)) for h in histories])
    scores = np.zeros((n_users, n_items), dtype=np.float32)
    ranks = pessimistic_ranks(scores, targets, history_mask(histories, n_items))
    assert ranks.tolist() == [n_items - len(h) for h in histories]
    assert hit_rate(ranks, 10) <= 10 / n_items
    # the reported ranks (seeded random ties): a constant model's target lands uniformly among the
    # non-excluded items, so HR@10 ~ 10/N: never 1, never rewarded for the item ids
    ranks = ranks_of_targets(scores, targets, history_mask(histories, n_items), seed=3)
    avail = np.array([n_items - len(h) for h in histories])
    assert ranks.min() >= 1 and np.all(ranks <= avail)
    assert abs(np.mean(ranks / avail) - 0.5) < 0.06
    big = ranks_of_targets(np.zeros((20_000, 100)), np.arange(20_000) % 100, seed=0)
    assert hit_rate(big, 10) == pytest.approx(10 / 100, abs=0.01)
    # a random model gets HR@10 close to 10/N (an optimistic tie rule would not change it; argsort()[0] would)
    random_scores = rng.random((n_users, n_items))
    ranks = pessimistic_ranks(random_scores, targets, history_mask(histories, n_items))
    assert ranks.min() >= 1 and ranks.max() <= n_items
    assert abs(np.mean(ranks) - n_items / 2) < n_items * 0.1


class ConstantScores:
    """A model that scores every item the same (a test double for evaluate_retriever, not the code under test)."""

    name: ClassVar[str] = "constant"

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.ones((len(histories), self.n_items), dtype=np.float32)


def test_evaluate_retriever_constant_model_on_synthetic(synth_split: Split) -> None:
    n = synth_split.n_items
    for stage in ("valid", "test"):
        r = evaluate_retriever(ConstantScores(n), synth_split, stage, ks=(10,), batch_size=64)  # type: ignore[arg-type]
        avail = np.array([n - len(h) for h in synth_split.histories(stage)])
        assert np.all(r["ranks"] >= 1) and np.all(r["ranks"] <= avail)
        expected = float(np.mean(np.minimum(10, avail) / avail))  # a uniform rank among the available items
        assert abs(r["metrics"]["HR@10"] - expected) < 4 * np.sqrt(expected / len(avail))


# ---------------------------------------------------------------------------- top-k
def _reference_top_k(row: np.ndarray, history: np.ndarray, k: int, user: int = 0, seed: int = 0) -> list[int]:
    s = np.where(np.isnan(row), -np.inf, row).astype(np.float64)
    hist = set(history.tolist())
    keys = tie_keys(np.full(len(s), user), np.arange(len(s)), seed)
    return sorted(range(len(s)), key=lambda i: (i in hist, -s[i], int(keys[i])))[:k]


def _key_order(items: list[int], user: int = 0, seed: int = 0) -> list[int]:
    keys = tie_keys(np.full(len(items), user), np.array(items), seed)
    return [items[j] for j in np.argsort(keys, kind="stable")]


def test_top_k_ties_in_seeded_random_order_history_excluded_best_first() -> None:
    scores = np.array([[1.0, 5.0, 5.0, 3.0, 5.0, 0.0]])
    idx, vals = top_k(scores, [np.array([1])], 3)
    assert idx.tolist() == [[*_key_order([2, 4]), 3]]
    assert vals.tolist() == [[5.0, 5.0, 3.0]]
    # the tie order is not the item order: over users and seeds, both orders of a tied pair occur
    orders = {tuple(top_k(scores, [np.array([1])], 2, users=np.array([u]), seed=sd)[0][0])
              for u in range(8) for sd in range(4)}
    assert orders == {(2, 4), (4, 2)}


def test_top_k_never_picks_history_over_nan_or_minus_inf() -> None:
    scores = np.array([[-np.inf, np.nan, 5.0, np.nan, 1.0]])
    idx, vals = top_k(scores, [np.array([0, 4])], 3)
    assert idx.tolist() == [[2, *_key_order([1, 3])]]
    assert vals[0, 0] == 5.0 and np.all(np.isneginf(vals[0, 1:]))
    # asked for more than the non-history items: history items come last
    idx, _ = top_k(scores, [np.array([0, 4])], 5)
    assert idx.tolist() == [[2, *_key_order([1, 3]), *_key_order([0, 4])]]


def test_top_k_exact_on_real_size_arrays_with_many_ties() -> None:
    rng = np.random.default_rng(1)
    n_users, n_items = 64, 4_000
    scores = rng.integers(0, 4, size=(n_users, n_items)).astype(np.float32)  # heavy ties everywhere
    scores[::7, ::13] = np.nan
    histories = [rng.choice(n_items, size=int(rng.integers(0, 300)), replace=False) for _ in range(n_users)]
    users = np.arange(100, 100 + n_users)
    for k in (1, 10, 50):
        idx, vals = top_k(scores, histories, k, users=users, seed=5)
        assert idx.shape == (n_users, k) and idx.dtype == np.int64
        for b in range(n_users):
            assert idx[b].tolist() == _reference_top_k(scores[b], histories[b], k, user=100 + b, seed=5)
            assert not set(idx[b].tolist()) & set(histories[b].tolist())
            assert np.all(np.diff(vals[b]) <= 0)


def test_rank_is_the_position_in_the_written_list() -> None:
    """What is written is what is scored: with heavy ties, NaN and history, every target's rank equals its
    position in top_k's list (when it is in the list) and exceeds the list length otherwise."""
    rng = np.random.default_rng(2)
    n_users, n_items, k = 200, 300, 20
    scores = rng.integers(0, 3, size=(n_users, n_items)).astype(np.float32)
    scores[::5, ::7] = np.nan
    histories = [rng.choice(n_items, size=int(rng.integers(1, 50)), replace=False) for _ in range(n_users)]
    targets = np.array([rng.choice(np.setdiff1d(np.arange(n_items), h)) for h in histories])
    users = np.arange(n_users) * 3
    ranks = ranks_of_targets(scores, targets, history_mask(histories, n_items), users=users, seed=9)
    idx, _ = top_k(scores, histories, k, users=users, seed=9)
    for b in range(n_users):
        row = idx[b].tolist()
        assert (row.index(targets[b]) + 1 if targets[b] in row else k + 1) == min(ranks[b], k + 1)
    assert 0 < np.mean(ranks <= k) < 1
    # batches of any size give the same ranks (the tie order belongs to the user, not the batch position)
    half = ranks_of_targets(scores[100:], targets[100:], history_mask(histories[100:], n_items), users=users[100:],
                            seed=9)
    np.testing.assert_array_equal(half, ranks[100:])
    # the pessimistic rank bounds it from above
    assert np.all(ranks <= pessimistic_ranks(scores, targets, history_mask(histories, n_items)))


def test_recall_of_candidates() -> None:
    cands = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert recall_of_candidates(cands, np.array([3, 0, 7])) == pytest.approx(2 / 3)
    assert recall_of_candidates(cands[:0], np.array([], dtype=np.int64)) == 0.0


# ---------------------------------------------------------------------------- retrievers through evaluation
@pytest.mark.parametrize("name", ["popularity", "itemknn"])
def test_batch_scores_equal_one_by_one(synth_split: Split, name: str) -> None:
    model = make_retriever(name).fit(synth_split.train, synth_split.n_items)
    hist = synth_split.histories("test")[:40] + [np.array([], dtype=np.int64)]
    batch = model.score(hist)
    assert batch.shape == (len(hist), synth_split.n_items)
    for b, h in enumerate(hist):
        np.testing.assert_array_equal(batch[b], model.score([h])[0])


def test_popularity_counts_only_training_data(synth_split: Split) -> None:
    model = make_retriever("popularity").fit(synth_split.train, synth_split.n_items)
    want = np.bincount(np.concatenate(synth_split.train), minlength=synth_split.n_items)
    np.testing.assert_array_equal(model.score([np.array([0])])[0], want.astype(np.float32))


def test_itemknn_beats_popularity_on_planted_structure(synth_split: Split) -> None:
    results: dict[str, Any] = {}
    for name in ("popularity", "itemknn"):
        model = make_retriever(name).fit(synth_split.train, synth_split.n_items)
        results[name] = {"test": evaluate_retriever(model, synth_split, "test", ks=(10,), candidates=20)["metrics"]}
    assert results["itemknn"]["test"]["NDCG@10"] > results["popularity"]["test"]["NDCG@10"] + 0.05
    assert results["itemknn"]["test"]["Recall@20"] >= results["itemknn"]["test"]["HR@10"]
    assert results_table(results, "test").row_count == 2


# ---------------------------------------------------------------------------- `palr evaluate` end to end
def write_synthetic_csv(path: Path, seed: int = 0) -> Path:
    raw = synthetic_raw(n_users=80, n_items=60, seed=seed)
    assert raw.times is not None
    lines = ["user,item,timestamp"] + [f"{u},{i},{int(t)}" for u, i, t in zip(raw.users, raw.items, raw.times)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_palr_evaluate_end_to_end(tmp_path: Path) -> None:
    csv_path = write_synthetic_csv(tmp_path / "inter.csv")
    runner = CliRunner()
    outputs = []
    for run in ("a", "b"):
        out, preds = tmp_path / f"r_{run}.json", tmp_path / f"p_{run}.jsonl"
        res = runner.invoke(app, ["evaluate", "--dataset", f"csv:{csv_path}", "--retriever", "popularity",
                                  "--out", str(out), "--predictions", str(preds), "--seed", "7"])
        assert res.exit_code == 0, res.output
        outputs.append((out, preds))
    doc = json.loads(outputs[0][0].read_text())
    assert set(doc) >= {"protocol", "dataset", "results", "timings"}
    assert "stable sort" in doc["protocol"]["order"] and "seeded random order" in doc["protocol"]["ties"]
    assert doc["dataset"]["name"] == f"csv:{csv_path}"
    assert set(doc["results"]["popularity"]) == {"valid", "test"}
    assert 0.0 <= doc["results"]["popularity"]["test"]["HR@10"] <= 1.0

    dataset = load_dataset(f"csv:{csv_path}")
    lines = outputs[0][1].read_text().splitlines()
    assert len(lines) == dataset.n_users
    seen = set()
    for line in lines:
        rec = json.loads(line)
        u = dataset.user_index(rec["user"])
        seen.add(rec["user"])
        history = {dataset.catalog.item_ids[i] for i in dataset.sequences[u][:-1]}
        assert len(rec["items"]) >= 10 and len(set(rec["items"])) == len(rec["items"])
        assert all(dataset.catalog.has(i) for i in rec["items"])
        assert not history & set(rec["items"])
    assert seen == set(dataset.user_ids)
    # the same seed gives byte-identical prediction files
    assert outputs[0][1].read_bytes() == outputs[1][1].read_bytes()


def test_lists_never_hold_history_on_a_tiny_catalogue(synth_split: Split) -> None:
    """With 20 predictions asked and a history that leaves fewer items, the lists are cut, never padded with
    history items."""
    from palr.data.preprocess import preprocess
    from palr.data.sources import RawData

    rows = [(f"u{u}", f"i{(u + k) % 8}", k) for u in range(8) for k in range(6)]
    raw = RawData([r[0] for r in rows], [r[1] for r in rows], [float(r[2]) for r in rows], {}, {}, "items")
    split = Split.leave_one_out(preprocess(raw, "tiny"))
    model = make_retriever("popularity").fit(split.train, split.n_items)
    r = evaluate_retriever(model, split, "test", ks=(10,), candidates=20, predictions=20)
    assert r["predictions"].shape == (8, 3) and r["candidates"].shape == (8, 3)
    for row, h in zip(r["predictions"], split.histories("test"), strict=True):
        assert not set(row.tolist()) & set(h.tolist())
    assert r["metrics"]["Recall@20"] == 1.0


def test_palr_evaluate_itemknn_predictions_reproducible(tmp_path: Path) -> None:
    csv_path = write_synthetic_csv(tmp_path / "inter.csv", seed=3)
    runner = CliRunner()
    blobs = []
    for run in ("a", "b"):
        preds = tmp_path / f"p_{run}.jsonl"
        res = runner.invoke(app, ["evaluate", "-d", f"csv:{csv_path}", "-r", "itemknn", "-r", "popularity",
                                  "--out", str(tmp_path / f"r_{run}.json"), "--predictions", str(preds)])
        assert res.exit_code == 0, res.output
        blobs.append(preds.read_bytes())
    assert blobs[0] == blobs[1]
    doc = json.loads((tmp_path / "r_a.json").read_text())
    assert list(doc["results"]) == ["itemknn", "popularity"]
