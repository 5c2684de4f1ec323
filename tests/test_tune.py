"""palr tune: an Optuna search on validation NDCG@10 (tiny synthetic data, tiny budgets)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from palr.core.errors import PalrError
from palr.data import Split
from palr.retrieval.base import load_retriever
from palr.train.tune import load_space_file, search_space, tune

pytest.importorskip("optuna")

TINY = {"hidden": 16, "heads": 1, "layers": 1, "max_len": 20, "epochs": 4, "patience": 10, "batch_size": 64}


def test_tune_sasrec_saves_best_run_and_trials(synth_split: Split, tmp_path: Path) -> None:
    space = {"dropout": {"type": "float", "low": 0.0, "high": 0.3}, "lr": {"type": "float", "low": 1e-3,
                                                                          "high": 1e-2, "log": True}}
    # two good settings first, then a hopeless one (lr 1e-7): the median pruner stops it on its curve
    # (trials=3 ends the search; the budget is only a guard, generous for a loaded machine)
    first = [{"dropout": 0.1, "lr": 1e-2}, {"dropout": 0.2, "lr": 5e-3}, {"dropout": 0.1, "lr": 1e-7}]
    space["lr"]["low"] = 1e-7
    res = tune("synthetic", "sasrec", tmp_path / "t", budget_s=900, trials=3, space=space, fixed=TINY,
               split=synth_split, enqueue=first)
    rows = list(csv.DictReader((tmp_path / "t" / "trials.csv").open()))
    assert len(rows) == len(res.trials) == 3 and {"dropout", "lr", "hidden"} <= set(rows[0])
    assert [t["state"] for t in res.trials] == ["complete", "complete", "pruned"]
    assert res.trials[2]["stopped"] == "pruned" and res.trials[2]["epochs"] < TINY["epochs"]
    done = [t for t in res.trials if t["state"] == "complete"]
    assert done and res.best_value == pytest.approx(max(t["value"] for t in done))
    assert all(t["epochs"] for t in res.trials)  # SASRec reported its validation curve to the pruner
    model = load_retriever(res.best_run / "model")
    assert model.score(synth_split.histories("test")[:3]).shape == (3, synth_split.n_items)
    saved = json.loads((res.best_run / "metrics.json").read_text())
    assert saved["valid"]["NDCG@10"] == pytest.approx(res.best_value)
    params = json.loads((res.best_run / "config.json").read_text())["config"]["params"]
    # the saved run is the best completed trial's: one of the two enqueued good settings (any value Optuna
    # may draw lies in [0, 0.3], so a range check could not fail)
    [best] = [t for t in done if t["value"] == res.best_value]
    searched = {k: best["params"][k] for k in ("dropout", "lr")}
    assert searched in first[:2] and {k: res.best_params[k] for k in best["params"]} == best["params"]
    assert {k: params[k] for k in (*TINY, "dropout", "lr")} == {**TINY, **searched}
    study = json.loads((tmp_path / "t" / "study.json").read_text())
    assert study["best"]["value"] == pytest.approx(res.best_value) and "lr" in study["space"]


def test_tune_stops_at_the_budget(synth_split: Split, tmp_path: Path) -> None:
    res = tune("synthetic", "sasrec", tmp_path / "t", budget_s=0.5, trials=50,
               space={"dropout": {"type": "float", "low": 0.0, "high": 0.3}}, fixed={**TINY, "epochs": 50},
               split=synth_split)
    assert len(res.trials) == 1 and res.trials[0]["stopped"] == "budget" and res.trials[0]["epochs"] < 50


def test_tune_without_parameters_runs_once(synth_split: Split, tmp_path: Path) -> None:
    res = tune("synthetic", "popularity", tmp_path / "p", budget_s=30, trials=5, split=synth_split)
    assert len(res.trials) == 1 and res.best_run is not None and (res.best_run / "run.json").exists()


def test_space_overrides(tmp_path: Path) -> None:
    f = tmp_path / "space.toml"
    f.write_text('[sasrec]\nlayers = 2\nhidden = "default"\n[sasrec.dropout]\ntype = "float"\nlow = 0.2\nhigh = 0.4\n')
    space = search_space("sasrec", load_space_file(f, "sasrec"), fixed={"lr": 1e-3})
    assert space["layers"] == 2 and "hidden" not in space and "lr" not in space
    assert space["dropout"] == {"type": "float", "low": 0.2, "high": 0.4}
    j = tmp_path / "space.json"
    j.write_text(json.dumps({"batch_size": {"type": "categorical", "choices": [32]}}))
    assert search_space("sasrec", load_space_file(j, "sasrec"))["batch_size"]["choices"] == [32]
    for bad in ({"x": {"type": "float", "low": 2, "high": 1}}, {"x": {"type": "nope"}},
                {"x": {"type": "float", "low": 0, "high": 1, "log": True}}, {"x": {"type": "categorical"}}):
        with pytest.raises(PalrError, match="search space x"):
            search_space("sasrec", bad)
    with pytest.raises(PalrError, match="unknown retriever"):
        search_space("nope")
    assert search_space("itemknn")["neighbours"]["log"] is True


def test_cli_tune_then_evaluate_best(synth_split: Split, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from palr.cli.main import app

    data = tmp_path / "events.csv"
    with data.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user", "item", "timestamp"])
        ds = synth_split.dataset
        for u, seq in enumerate(ds.sequences):
            w.writerows([ds.user_ids[u], ds.catalog.item_ids[i], 1000 + t] for t, i in enumerate(seq))
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"itemknn": {"neighbours": {"type": "int", "low": 5, "high": 50}, "recent": 10,
                                             "decay": "default", "shrink": "default", "sequential": "default"}}))
    runner = CliRunner()
    out = tmp_path / "tune"
    r = runner.invoke(app, ["tune", "-d", f"csv:{data}", "-r", "itemknn", "--out", str(out), "--budget", "60",
                            "--trials", "2", "--space", str(space)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 2 and all(row["recent"] == "10" for row in rows) and "decay" not in rows[0]
    r = runner.invoke(app, ["evaluate", "--run", str(out / "best"), "--out", str(tmp_path / "res.json"),
                            "--predictions", str(tmp_path / "p.jsonl")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "res.json").read_text())
    assert doc["results"]["itemknn"]["valid"]["NDCG@10"] == pytest.approx(
        json.loads((out / "study.json").read_text())["best"]["value"])
