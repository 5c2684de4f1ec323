"""`palr report` (self-contained HTML with figures and the metrics table) and the model card of every run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")


def test_report_is_self_contained_with_figures_and_metrics(tiny_ml100k_run: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from palr.cli.main import app

    out = tmp_path / "r.html"
    # the run twice: the per-run sections and the run-against-run comparison
    r = CliRunner().invoke(app, ["report", str(tiny_ml100k_run["palr"]), str(tiny_ml100k_run["palr"]),
                                 "--out", str(out), "--data-dir", str(tiny_ml100k_run["data_dir"])])
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/svg\+xml;base64,', page)) >= 2 * 5
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing to fetch
    table = page[page.index("<table class=metrics>"):]
    assert "NDCG@10" in table and "difference [95% CI]" in table and "PALR (end to end)" in table
    palr_ndcg = json.loads((tiny_ml100k_run["palr"] / "test_results.json").read_text())["results"][
        "PALR (end to end)"]["test"]["NDCG@10"]
    assert f"{palr_ndcg:.4f}" in table  # the table shows the run's own evaluation
    assert "Runs compared" in page and "Example users" in page


def test_finetuning_records_its_training_curve(tiny_ml100k_run: dict[str, Path]) -> None:
    m = json.loads((tiny_ml100k_run["palr"] / "metrics.json").read_text())
    assert len(m["curve"]) == 1 and m["curve"][0]["batches"] > 0 and m["curve"][0]["train_loss"] > 0
    assert m["curve"][0]["valid_ndcg@10"] == pytest.approx(m["valid_per_epoch"][0]["eval_ndcg@10"], abs=1e-4)
    assert len(m["train_loss_steps"]) == m["curve"][0]["batches"]  # few batches: every one kept
    hist = json.loads((tiny_ml100k_run["palr"] / "retriever" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2] and all("valid_NDCG@10" in h for h in hist)


def test_every_run_has_a_model_card(tiny_ml100k_run: dict[str, Path], tmp_path: Path) -> None:
    from palr.runs.card import write_model_card

    retr = (tiny_ml100k_run["retriever"] / "README.md").read_text()
    assert "sasrec retriever on ml-100k" in retr and "## Protocol" in retr and "load_run(" in retr
    card = (tiny_ml100k_run["palr"] / "README.md").read_text()
    for part in ("## Data", "## Protocol", "## Metrics", "## Configuration", "## How to load", "PALR.load("):
        assert part in card
    assert "PALR (end to end)" in card and "not evaluated yet" not in card  # test figures after evaluation
    # a LoRA adapter's README (peft's empty template) points at the card
    run = tmp_path / "run"
    shutil.copytree(tiny_ml100k_run["palr"], run)
    (run / "adapter").mkdir()
    (run / "adapter" / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")
    write_model_card(run)
    assert "../README.md" in (run / "adapter" / "README.md").read_text()
    assert "Model Card for Model ID" not in (run / "README.md").read_text()


def test_report_of_a_retriever_run(tiny_ml100k_run: dict[str, Path], tmp_path: Path) -> None:
    from palr.evaluate.report import load_run_data, write_report

    rd = load_run_data(tiny_ml100k_run["retriever"], tiny_ml100k_run["data_dir"])
    assert list(rd.ranks) == ["sasrec (retriever)"] and len(rd.retriever_history) == 2
    # the same full-ranking ranks as the PALR run kept for its retriever
    import numpy as np

    kept = np.load(tiny_ml100k_run["palr"] / "test_ranks.npz")["retriever"]
    assert np.array_equal(rd.ranks["sasrec (retriever)"], kept)
    page = write_report([tiny_ml100k_run["retriever"]], tmp_path / "r.html",
                        data_dir=tiny_ml100k_run["data_dir"]).read_text()
    assert page.count("<img ") == 5 and "<table class=metrics>" in page
