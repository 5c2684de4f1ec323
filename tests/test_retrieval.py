"""The retriever contract, run against every registered retriever on synthetic data; SASRec learns the
planted "item k -> k+1" pattern; runs round-trip through the CLI; bad input is refused plainly."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from palr.core.errors import PalrError, RunError
from palr.core.topk import history_mask
from palr.data import Split
from palr.evaluate.retrievers import evaluate_retriever
from palr.retrieval.base import REGISTRY, Retriever, load_retriever, make_retriever, recommend
from palr.retrieval.candidates import candidates_for
from palr.retrieval.load import load_run
from palr.retrieval.text import text_model_available
from palr.train.retriever import fit_retriever, train_run

# small settings so that every model fits in a few seconds on 2 cores
FAST: dict[str, dict[str, Any]] = {
    "popularity": {},
    "itemknn": {},
    "sasrec": {"hidden": 32, "layers": 1, "heads": 2, "max_len": 20, "epochs": 12, "patience": 4,
               "batch_size": 64, "lr": 3e-3, "dropout": 0.1},
    "als": {"factors": 16, "iterations": 5},
    "bpr": {"factors": 16, "iterations": 20, "learning_rate": 0.05},  # lr 0.01 trails popularity on this data
    "text": {},
}
NEEDS_EXTRA = {"text": text_model_available}


def _fit(name: str, split: Split, seed: int = 0) -> Retriever:
    if name in NEEDS_EXTRA and not NEEDS_EXTRA[name]():
        pytest.skip(f"{name} needs an optional extra that is not installed")
    return fit_retriever(name, split, FAST[name], seed=seed)[0]


@pytest.fixture(scope="module")
def fitted(synth_split: Split) -> dict[str, Retriever]:
    return {}


def _get(fitted: dict[str, Retriever], name: str, split: Split) -> Retriever:
    if name not in fitted:
        fitted[name] = _fit(name, split)
    return fitted[name]


def test_registry_lists_every_retriever() -> None:
    assert set(FAST) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(FAST))
class TestContract:
    """Every retriever: shapes, dtype, history excluded, batch == single, seeds, save/load."""

    def test_scores_shape_and_dtype(self, name: str, fitted: dict, synth_split: Split) -> None:
        model = _get(fitted, name, synth_split)
        hist = synth_split.histories("test")[:7]
        s = model.score(hist)
        assert s.shape == (7, synth_split.n_items) and s.dtype == np.float32
        assert np.isfinite(s).all()
        assert isinstance(model, Retriever)
        json.dumps(model.params())  # the hyper-parameters are JSON, saved with the run

    def test_recommend_excludes_history(self, name: str, fitted: dict, synth_split: Split) -> None:
        model = _get(fitted, name, synth_split)
        hist = synth_split.histories("test")[:20]
        items, scores = recommend(model, hist, k=15)
        assert items.shape == (20, 15) and scores.shape == (20, 15)
        assert not history_mask(hist, synth_split.n_items)[np.arange(20)[:, None], items].any()
        assert (np.diff(scores, axis=1) <= 0).all()

    def test_batch_equals_single(self, name: str, fitted: dict, synth_split: Split) -> None:
        model = _get(fitted, name, synth_split)
        hist = synth_split.histories("test")[:9]
        batch = model.score(hist)
        single = np.vstack([model.score([h]) for h in hist])
        np.testing.assert_allclose(batch, single, rtol=1e-5, atol=1e-5)

    def test_same_seed_same_scores(self, name: str, fitted: dict, synth_split: Split) -> None:
        model = _get(fitted, name, synth_split)
        again = _fit(name, synth_split)
        hist = synth_split.histories("valid")[:30]
        np.testing.assert_array_equal(model.score(hist), again.score(hist))

    def test_save_load_identical(self, name: str, fitted: dict, synth_split: Split, tmp_path: Path) -> None:
        model = _get(fitted, name, synth_split)
        model.save(tmp_path)
        loaded = load_retriever(tmp_path)
        hist = synth_split.histories("test")[:30]
        np.testing.assert_array_equal(model.score(hist), loaded.score(hist))
        assert loaded.params() == model.params()

    def test_beats_popularity(self, name: str, fitted: dict, synth_split: Split) -> None:
        if name == "popularity":
            pytest.skip("the baseline itself")
        model = _get(fitted, name, synth_split)
        pop = _get(fitted, "popularity", synth_split)
        ndcg = evaluate_retriever(model, synth_split, "test")["metrics"]["NDCG@10"]
        base = evaluate_retriever(pop, synth_split, "test")["metrics"]["NDCG@10"]
        assert ndcg > base


def test_sasrec_learns_planted_pattern(fitted: dict, synth_split: Split) -> None:
    """With p(k -> k+1) = 0.7 the next item is mostly the successor: SASRec must find it."""
    model = _get(fitted, "sasrec", synth_split)
    m = evaluate_retriever(model, synth_split, "test")["metrics"]
    pop = evaluate_retriever(_get(fitted, "popularity", synth_split), synth_split, "test")["metrics"]
    assert m["HR@10"] > 0.5 and m["HR@10"] > 3 * pop["HR@10"]
    assert model.history and "valid_NDCG@10" in model.history[0]  # type: ignore[attr-defined]
    params = model.params()
    assert params["max_len"] == 20 and params["dropout"] == 0.1  # explicit values are never replaced


def test_sasrec_fills_defaults_from_data(synth_split: Split) -> None:
    from palr.retrieval.sasrec import SASRec

    c = SASRec(dropout=0.3).resolve(synth_split.train, synth_split.n_items)
    assert c["dropout"] == 0.3  # given: kept
    assert c["max_len"] == 50 and c["epochs"] == 50 and c["batch_size"] == 256  # short: the Amazon-like defaults
    long = [np.arange(i, i + 40) % 30 for i in range(10)]
    c = SASRec().resolve(long, 30)
    assert (c["max_len"], c["dropout"], c["lr"], c["patience"]) == (200, 0.3, 2e-3, 8)  # long: MovieLens-like


def test_sasrec_reports_and_smooths(synth_split: Split) -> None:
    """report() sees every validation; the tracked value is the EMA of NDCG@10; raising in report stops."""
    seen: list[tuple[int, dict]] = []
    params = {**FAST["sasrec"], "epochs": 4, "eval_every": 2, "smooth": 0.5, "patience": 100}
    model = make_retriever("sasrec", **params)
    model.fit(synth_split.train, synth_split.n_items,
              valid=(synth_split.histories("valid"), synth_split.targets("valid")),
              report=lambda epoch, entry: seen.append((epoch, dict(entry))))
    assert [e for e, _ in seen] == [2, 4]
    raw = [entry["valid_NDCG@10"] for _, entry in seen]
    assert seen[1][1]["valid_NDCG@10_smoothed"] == pytest.approx(0.5 * raw[0] + 0.5 * raw[1], abs=1e-5)

    class Stop(Exception):
        pass

    def stop(epoch: int, entry: dict) -> None:
        raise Stop

    with pytest.raises(Stop):
        make_retriever("sasrec", **params).fit(synth_split.train, synth_split.n_items,
                                               valid=(synth_split.histories("valid"),
                                                      synth_split.targets("valid")), report=stop)


def test_candidates_for(fitted: dict, synth_split: Split) -> None:
    model = _get(fitted, "itemknn", synth_split)
    for stage in ("valid", "test"):
        items, scores = candidates_for(model, synth_split, stage, k=25)
        hist = synth_split.histories(stage)
        assert items.shape == scores.shape == (len(hist), 25) and items.dtype == np.int64
        assert not history_mask(hist, synth_split.n_items)[np.arange(len(hist))[:, None], items].any()
        ref, _ = recommend(model, hist[:5], k=25)
        np.testing.assert_array_equal(items[:5], ref)


@pytest.mark.parametrize("params, message", [
    ({"hidden": 30, "heads": 4}, "not divisible"),
    ({"loss": "bogus"}, "loss must be"),
    ({"dropout": 1.5}, "dropout"),
    ({"smooth": 1.0}, "smooth"),
    ({"lr": 0}, "lr must be"),
    ({"nonsense": 1}, "unknown SASRec parameter"),
])
def test_sasrec_bad_settings(synth_split: Split, params: dict, message: str) -> None:
    with pytest.raises(PalrError, match=message):
        make_retriever("sasrec", **params).fit(synth_split.train, synth_split.n_items)


def test_too_small_data_is_refused() -> None:
    for name in ("sasrec", "als", "bpr"):
        with pytest.raises(PalrError):
            make_retriever(name).fit([], 10)
    with pytest.raises(PalrError, match="at least 2 items"):
        make_retriever("sasrec").fit([np.array([0, 0])], 1)


def test_sasrec_sampled_softmax_learns(synth_split: Split) -> None:
    params = {**FAST["sasrec"], "loss": "sampled", "negatives": 32, "epochs": 8}
    model = fit_retriever("sasrec", synth_split, params)[0]
    assert evaluate_retriever(model, synth_split, "test")["metrics"]["HR@10"] > 0.3


# ---------------------------------------------------------------------------- runs and the CLI
def _write_csv(path: Path, split: Split) -> None:
    ds = split.dataset
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user", "item", "timestamp"])
        for u, seq in enumerate(ds.sequences):
            for t, i in enumerate(seq):
                w.writerow([ds.user_ids[u], ds.catalog.item_ids[i], 1000 + t])


def test_cli_train_then_evaluate_run(synth_split: Split, tmp_path: Path) -> None:
    from palr.cli.main import app

    data = tmp_path / "events.csv"
    _write_csv(data, synth_split)
    run, out = tmp_path / "run", tmp_path / "results.json"
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--dataset", f"csv:{data}", "--retriever", "sasrec", "--out", str(run),
                            "--seed", "3", "-p", "hidden=16", "-p", "layers=1", "-p", "epochs=3", "-p", "max_len=10"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["params"]["hidden"] == 16 and cfg["config"]["params"]["seed"] == 3
    assert cfg["config"]["params"]["dropout"] == 0.5 and cfg["config"]["params"]["max_len"] == 10
    assert cfg["config"]["params"]["batch_size"] == 256  # resolved default saved, not None
    assert "torch" in cfg["versions"] and cfg["protocol"]["split"].startswith("leave-one-out")
    assert (run / "model" / "weights.safetensors").exists() and (run / "run.json").exists()
    assert "epoch" in (run / "train.log").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert "NDCG@10" in metrics["valid"] and metrics["history"]

    preds = tmp_path / "preds.jsonl"
    r = runner.invoke(app, ["evaluate", "--run", str(run), "--out", str(out), "--predictions", str(preds),
                            "--candidates", "50"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert "Recall@50" in doc["results"]["sasrec"]["test"]
    cands = [json.loads(line) for line in (tmp_path / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == synth_split.dataset.n_users and len(cands[0]["items"]) == 50
    # the saved run scores exactly like a reload
    _, model, split = load_run(run)
    again = evaluate_retriever(model, split, "test")["metrics"]
    assert again["NDCG@10"] == pytest.approx(doc["results"]["sasrec"]["test"]["NDCG@10"])


def test_run_from_another_dataset_is_refused(synth_split: Split, tmp_path: Path) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _write_csv(a, synth_split)
    rows = a.read_text().splitlines()
    b.write_text("\n".join(rows[:-40]) + "\n")  # fewer interactions: another data set
    run = train_run(f"csv:{a}", "popularity", tmp_path / "run", progress=False)
    with pytest.raises(RunError, match="was trained on data set"):
        from palr.data import load_split
        from palr.runs.store import check_dataset, read_run

        check_dataset(read_run(run), load_split(f"csv:{b}").dataset, run)
    (run / "run.json").write_text(json.dumps({"format": 999, "kind": "retriever", "palr": "9.9"}))
    with pytest.raises(RunError, match="run format"):
        load_run(run)
    (run / "run.json").unlink()
    with pytest.raises(RunError, match="not a complete run"):
        load_run(run)
