"""The feature re-ranker: features from the training split only, trees trained on validation candidates with a
held-out share, a complete PALR run that `palr evaluate` scores and an independent scorer agrees with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from palr.data import Split
from palr.data.dataset import Dataset
from palr.rank.features import CandidateFeatures, tfidf_embeddings
from palr.retrieval.base import make_retriever
from palr.retrieval.candidates import candidates_for

pytest.importorskip("lightgbm")


def with_other_future(split: Split, seed: int = 5) -> Split:
    """The same training sequences, other validation and test items."""
    ds = split.dataset
    rng = np.random.default_rng(seed)
    seqs = [np.concatenate([s[:-2], rng.integers(0, ds.n_items, 2)]) for s in ds.sequences]
    return Split.leave_one_out(Dataset(ds.name, ds.user_ids, seqs, ds.catalog, ds.protocol, ds.user_attributes))


def test_features_depend_on_the_training_split_only(synth_split: Split) -> None:
    other = with_other_future(synth_split)
    a = CandidateFeatures().fit(synth_split, "tfidf")
    b = CandidateFeatures().fit(other, "tfidf")
    ret = make_retriever("popularity").fit(synth_split.train, synth_split.n_items)
    cands, scores = candidates_for(ret, synth_split, "valid", 15)
    hist = synth_split.train[:40]
    fa = a.transform(hist, cands[:40], scores[:40])
    np.testing.assert_array_equal(fa, b.transform(hist, cands[:40], scores[:40]))
    assert fa.shape == (40, 15, len(a.names)) and np.isfinite(fa[..., :12]).all()
    # a changed training item does change them: the test above can fail
    changed = Split(synth_split.dataset, [np.concatenate([s[:-1], s[:1]]) for s in synth_split.train],
                    synth_split.valid_targets, synth_split.test_targets)
    c = CandidateFeatures().fit(changed, "tfidf")
    assert not np.array_equal(fa, c.transform(hist, cands[:40], scores[:40]))


def test_tfidf_fallback_is_deterministic_and_normalised() -> None:
    texts = ["Heat (1995). Action, Crime", "Casino (1995). Crime, Drama", "Toy Story (1995). Animation"]
    e = tfidf_embeddings(texts, dim=512, seed=0)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(e, tfidf_embeddings(texts, dim=512, seed=0))
    assert e[0] @ e[1] > e[0] @ e[2]  # shared words are closer


def test_held_out_users_are_disjoint_and_the_trees_beat_the_retriever(synth_split: Split) -> None:
    from palr.rank.trees import FeatureRankerConfig, fit_feature_ranker, split_users

    fit_u, hold_u = split_users(200, 0.25, seed=0)
    assert not set(fit_u) & set(hold_u) and len(fit_u) + len(hold_u) == 200 and len(hold_u) == 50
    np.testing.assert_array_equal(hold_u, split_users(200, 0.25, seed=0)[1])
    ret = make_retriever("popularity").fit(synth_split.train, synth_split.n_items)
    valid = candidates_for(ret, synth_split, "valid", 30)
    cfg = FeatureRankerConfig(n_candidates=30, holdout=0.25, text_encoder="tfidf", min_data_in_leaf=20)
    _, m = fit_feature_ranker(synth_split, valid, cfg)
    assert m["holdout_users"] == 50 and m["fit_users"] == 150
    assert m["holdout_ndcg@10"] > m["holdout_ndcg@10_retriever"]  # synthetic data have sequential structure


def score_predictions(path: Path, ds: Dataset, k: int = 10) -> float:
    """An independent NDCG@k scorer of a predictions file (the test item = each user's last item)."""
    gains = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        target = ds.catalog.item_ids[ds.sequences[ds.user_index(row["user"])][-1]]
        items = row["items"][:k]
        gains.append(1 / np.log2(items.index(target) + 2) if target in items else 0.0)
    return float(np.mean(gains))


def test_cli_feature_run_evaluates_like_a_palr_run(tmp_path: Path) -> None:
    from test_palr import write_csv

    from palr.cli.main import app
    from palr.rank.pipeline import PALR

    name = write_csv(tmp_path, n_users=160, n_items=60)
    runner = CliRunner()
    res = runner.invoke(app, ["train", "-d", name, "-r", "itemknn", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["finetune", "--run", str(tmp_path / "r"), "--ranker", "features", "--candidates", "20", "--text-encoder", "tfidf",
                              "--out", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "f" / "ranking.json").read_text())["ranker"] == "features"
    res = runner.invoke(app, ["evaluate", "--run", str(tmp_path / "f"), "--out", str(tmp_path / "r.json"),
                              "--predictions", str(tmp_path / "p.jsonl"), "--retriever-predictions",
                              str(tmp_path / "rp.jsonl")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "r.json").read_text())
    palr = PALR.load(tmp_path / "f")
    ds = palr.split.dataset
    e2e = doc["results"]["PALR (end to end)"]["test"]
    assert score_predictions(tmp_path / "p.jsonl", ds) == pytest.approx(e2e["NDCG@10"], abs=1e-9)
    assert score_predictions(tmp_path / "rp.jsonl", ds) == pytest.approx(
        doc["results"]["itemknn (retriever)"]["test"]["NDCG@10"], abs=1e-9)
    # reloads to identical scores; recommend works for a user and for a bare history
    hist = palr.split.histories("test")[:5]
    cands, sc = palr.candidates(hist)
    again = PALR.load(tmp_path / "f")
    np.testing.assert_array_equal(palr.ranker.rank(hist, [None] * 5, cands, sc).scores,
                                  again.ranker.rank(hist, [None] * 5, cands, sc).scores)
    rec = palr.recommend(user=ds.user_ids[0], k=5)
    assert len(rec.items) == 5
    assert len(palr.recommend(history=[ds.catalog.item_ids[0]], k=3).items) == 3
