"""What is written is what is scored (an independent scorer of predictions.jsonl reproduces results.json,
popularity's ties included), per-user files, comparisons with CIs in results.json, `palr compare`, --seeds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_evaluation import write_synthetic_csv
from typer.testing import CliRunner

from palr.cli.main import app
from palr.core.errors import PalrError
from palr.core.metrics import per_user_metrics
from palr.data import load_split
from palr.evaluate.stats import compare_metrics, paired_bootstrap
from palr.evaluate.tables import comparison_pairs

ROOT = Path(__file__).resolve().parents[1]


def scorer():
    """benchmarks/score_predictions.py, the stand-alone scorer anyone can run."""
    spec = importlib.util.spec_from_file_location("score_predictions", ROOT / "benchmarks" / "score_predictions.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("report")
    csv_path = write_synthetic_csv(tmp / "inter.csv", seed=1)
    files = {"csv": csv_path, "dataset": f"csv:{csv_path}"}
    for first in ("popularity", "itemknn"):
        other = "itemknn" if first == "popularity" else "popularity"
        out, preds, per_user = tmp / f"{first}.json", tmp / f"{first}.jsonl", tmp / f"{first}.csv"
        res = CliRunner().invoke(app, ["evaluate", "-d", files["dataset"], "-r", first, "-r", other, "--out", str(out),
                                       "--predictions", str(preds), "--per-user", str(per_user), "--seed", "3"])
        assert res.exit_code == 0, res.output
        files[first] = {"results": out, "predictions": preds, "per_user": per_user, "output": res.output}
    return files


@pytest.mark.parametrize("model", ["popularity", "itemknn"])
def test_independent_scorer_reproduces_results_json(evaluated: dict, model: str) -> None:
    """Popularity scores are integer counts with many ties: the written lists and the metrics must agree."""
    mod = scorer()
    targets = mod.targets_of(evaluated["dataset"])
    scored = mod.score_file(evaluated[model]["predictions"], targets)
    results = json.loads(evaluated[model]["results"].read_text())
    assert mod.check(scored, results, model) == []
    want = results["results"][model]["test"]
    for k in (5, 10, 20):
        for m in ("HR", "NDCG", "MRR"):
            assert scored[f"{m}@{k}"] == pytest.approx(want[f"{m}@{k}"], abs=1e-12)
    assert mod.main([str(evaluated[model]["predictions"]), "-d", evaluated["dataset"],
                     "--results", str(evaluated[model]["results"]), "--model", model]) == 0


def test_scorer_detects_a_disagreement(evaluated: dict, tmp_path: Path) -> None:
    mod = scorer()
    results = json.loads(evaluated["popularity"]["results"].read_text())
    results["results"]["popularity"]["test"]["HR@10"] += 0.001
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(results))
    assert mod.main([str(evaluated["popularity"]["predictions"]), "-d", evaluated["dataset"], "--results", str(bad)]) == 1


def test_popularity_has_ties_that_the_order_breaks(evaluated: dict) -> None:
    """The case this guards: many equal scores around the cut-off (so a tie rule matters at all)."""
    split = load_split(evaluated["dataset"])
    counts = np.bincount(np.concatenate(split.train), minlength=split.n_items)
    assert len(np.unique(counts)) < split.n_items / 2


def test_per_user_file_and_comparisons_in_results_json(evaluated: dict) -> None:
    doc = json.loads(evaluated["popularity"]["results"].read_text())
    df = pd.read_csv(evaluated["popularity"]["per_user"], dtype={"user": str, "target": str})
    assert list(df.columns[:4]) == ["user", "target", "model", "rank"]
    for model in ("popularity", "itemknn"):
        sub = df[df["model"] == model]
        assert len(sub) == doc["results"][model]["test"]["users"]
        for m in ("HR@10", "NDCG@10", "MRR@20"):
            assert sub[m].mean() == pytest.approx(doc["results"][model]["test"][m], abs=1e-6)
    comp = doc["comparisons"]["itemknn vs popularity"]
    assert comp["model"] == "itemknn" and comp["baseline"] == "popularity"
    for stage in ("valid", "test"):
        c = comp[stage]["NDCG@10"]
        assert c["mean_a"] == pytest.approx(doc["results"]["itemknn"][stage]["NDCG@10"])
        assert c["diff_ci95"][0] <= c["diff"] <= c["diff_ci95"][1]
        assert c["ratio_ci95"][0] <= c["ratio"] <= c["ratio_ci95"][1]
        assert 0.0 <= c["p_value"] <= 1.0 and c["n_users"] == doc["results"]["itemknn"][stage]["users"]
    assert doc["statistics"]["n_boot"] == 2000
    ratio = doc["comparisons"]["itemknn vs popularity"]["test"]["NDCG@10"]["ratio"]
    assert "ratio [95% CI]" in evaluated["popularity"]["output"]  # the console shows the ratio with its CI
    assert f"{ratio:.3f}x [" in evaluated["popularity"]["output"]  # the console shows the ratio with its CI


def test_compare_command_on_per_user_and_prediction_files(evaluated: dict, tmp_path: Path) -> None:
    per_user = str(evaluated["popularity"]["per_user"])
    out = tmp_path / "cmp.json"
    res = CliRunner().invoke(app, ["compare", per_user, per_user, "--a-model", "itemknn", "--b-model", "popularity",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    want = json.loads(evaluated["popularity"]["results"].read_text())["comparisons"]["itemknn vs popularity"]["test"]
    for m in ("HR@10", "NDCG@10"):  # the same numbers as results.json (same users, same bootstrap seed)
        for f in ("mean_a", "mean_b", "diff", "ratio", "p_value"):
            assert doc["metrics"][m][f] == pytest.approx(want[m][f], abs=1e-6)
        assert doc["metrics"][m]["diff_ci95"] == pytest.approx(want[m]["diff_ci95"], abs=1e-5)
    # the two prediction files, scored against the data set: the same means as results.json
    res = CliRunner().invoke(app, ["compare", str(evaluated["itemknn"]["predictions"]),
                                   str(evaluated["popularity"]["predictions"]), "-d", evaluated["dataset"], "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["users"] == want["NDCG@10"]["n_users"]
    assert doc["metrics"]["NDCG@10"]["mean_a"] == pytest.approx(want["NDCG@10"]["mean_a"], abs=1e-12)
    assert doc["metrics"]["NDCG@10"]["mean_b"] == pytest.approx(want["NDCG@10"]["mean_b"], abs=1e-12)
    # errors: a predictions file without a data set; a per-user file with several models and none named
    for args in (["compare", str(evaluated["itemknn"]["predictions"]), per_user, "--b-model", "popularity"],
                 ["compare", per_user, per_user]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code != 0 and isinstance(res.exception, PalrError)


def test_baseline_option_and_pairs() -> None:
    assert comparison_pairs(["a", "b", "c"]) == [("b", "a"), ("c", "a")]
    assert comparison_pairs(["a", "b", "c"], "c") == [("a", "c"), ("b", "c")]
    with pytest.raises(PalrError):
        comparison_pairs(["a", "b"], "z")


def test_bad_seeds_are_refused(tmp_path: Path) -> None:
    csv_path = write_synthetic_csv(tmp_path / "inter.csv", seed=2)
    for bad in ("1,1", "0,x"):
        res = CliRunner().invoke(app, ["evaluate", "-d", f"csv:{csv_path}", "-r", "popularity", "--seeds", bad,
                                       "--out", str(tmp_path / "r.json")])
        assert res.exit_code != 0 and not (tmp_path / "r.json").exists()


def test_seeds_report_mean_and_sd(tmp_path: Path) -> None:
    csv_path = write_synthetic_csv(tmp_path / "inter.csv", seed=2)
    out, preds = tmp_path / "r.json", tmp_path / "p.jsonl"
    res = CliRunner().invoke(app, ["evaluate", "-d", f"csv:{csv_path}", "-r", "popularity", "-r", "itemknn",
                                   "--seeds", "0,1", "--out", str(out), "--predictions", str(preds)])
    assert res.exit_code == 0, res.output
    assert "±" in res.output
    doc = json.loads(out.read_text())
    assert doc["protocol"]["seeds"] == [0, 1] and set(doc["by_seed"]) == {"0", "1"}
    mod = scorer()
    targets = mod.targets_of(f"csv:{csv_path}")
    per_seed = []
    for s in (0, 1):
        scored = mod.score_file(tmp_path / f"p.seed{s}.jsonl", targets)  # each seed's own file and figures
        assert mod.check(scored, {"results": doc["by_seed"][str(s)]["results"]}, "popularity") == []
        per_seed.append(scored["NDCG@10"])
    summ = doc["seed_summary"]["popularity"]["test"]["NDCG@10"]
    assert summ["n"] == 2 and summ["mean"] == pytest.approx(np.mean(per_seed))
    assert summ["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    assert doc["results"]["popularity"]["test"]["NDCG@10"] == pytest.approx(summ["mean"])
    over = doc["comparisons_over_seeds"]["itemknn vs popularity"]["test"]["NDCG@10"]
    assert over["ratio"]["n"] == 2


def test_compare_metrics_names_must_match() -> None:
    # two models on the same 3 users, with different metric sets: only the names both have are compared,
    # each one exactly as paired_bootstrap compares that metric alone (a compared with itself, as this
    # test did before, gives zero differences whatever compare_metrics does)
    a = per_user_metrics(np.array([1, 2, 30]), ks=(10,))
    b = per_user_metrics(np.array([3, 1, 30]), ks=(5, 10))
    got = compare_metrics(a, b)
    assert set(got) == {"HR@10", "NDCG@10", "MRR@10"}
    # MRR@10: a = (1, 1/2, 0), b = (1/3, 1, 0): means 1/2 and 4/9
    assert got["MRR@10"].mean_a == pytest.approx(0.5) and got["MRR@10"].mean_b == pytest.approx(4 / 9)
    for m in got:
        assert got[m] == paired_bootstrap(a[m], b[m])
    assert set(compare_metrics(a, b, ["NDCG@10"])) == {"NDCG@10"}
    with pytest.raises(KeyError):
        compare_metrics(a, b, ["HR@5"])  # a has no HR@5
    with pytest.raises(ValueError, match="same users"):
        compare_metrics(a, per_user_metrics(np.array([1, 2]), ks=(10,)))
