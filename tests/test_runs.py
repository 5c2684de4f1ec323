"""Run directories: atomic writes, completeness marker, data set checks, a saved retriever reloads the same."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from palr.data import Dataset, Split
from palr.data.synthetic import synthetic_dataset
from palr.errors import RunError
from palr.retrieval.base import load_retriever, make_retriever
from palr.runs import begin_run, check_dataset, fingerprint, finish_run, read_run, write_atomic, write_json


def test_write_atomic_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "results.json"
    write_atomic(path, "first\n")
    write_atomic(path, "second\n")
    assert path.read_text() == "second\n"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_write_atomic_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    # a lone surrogate cannot be encoded: the write fails part-way through write_atomic
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "x" * 100_000 + "\ud800")
    assert list(tmp_path.iterdir()) == []
    path.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "new" * 100_000 + "\ud800")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_json(path, {"x": object()})
    assert path.read_text() == "old\n"


def test_write_json_numpy_values(tmp_path: Path) -> None:
    write_json(tmp_path / "m.json", {"a": np.int64(3), "b": np.float32(0.5), "c": np.arange(2), "p": tmp_path})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 3, "b": 0.5, "c": [0, 1], "p": str(tmp_path)}


def test_incomplete_run_is_refused(tmp_path: Path, synth: Dataset) -> None:
    run = begin_run(tmp_path / "run")
    (run / "config.json").write_text("{}")
    with pytest.raises(RunError, match="not a complete run"):
        read_run(run)
    with pytest.raises(RunError, match="does not exist"):
        read_run(tmp_path / "nowhere")
    finish_run(run, "retriever", synth, {"retriever": "popularity"}, {"valid": {"HR@10": 0.1}})
    cfg = read_run(run, "retriever")
    assert cfg["dataset"]["fingerprint"] == fingerprint(synth) and cfg["protocol"] == synth.protocol
    assert cfg["config"] == {"retriever": "popularity"}
    with pytest.raises(RunError, match="needs a 'palr' run"):
        read_run(run, "palr")
    # starting a new run in the same directory removes the completeness marker first
    begin_run(run)
    with pytest.raises(RunError, match="not a complete run"):
        read_run(run)
    with pytest.raises(RunError, match="already holds a run"):
        finish_run(run, "retriever", synth, {})
        begin_run(run, overwrite=False)


def test_other_run_format_is_refused(tmp_path: Path, synth: Dataset) -> None:
    run = begin_run(tmp_path / "run")
    finish_run(run, "retriever", synth, {})
    (run / "run.json").write_text(json.dumps({"format": 999, "kind": "retriever", "palr": "9.9"}))
    with pytest.raises(RunError, match="run format 999"):
        read_run(run)


def test_check_dataset_refuses_another_dataset(tmp_path: Path, synth: Dataset) -> None:
    run = begin_run(tmp_path / "run")
    finish_run(run, "retriever", synth, {})
    cfg = read_run(run)
    check_dataset(cfg, synth, run)  # the same data: accepted
    other = synthetic_dataset(n_users=200, n_items=120, seed=1)
    with pytest.raises(RunError, match="was trained on data set 'synthetic'"):
        check_dataset(cfg, other, run)
    renamed = Dataset("ml-100k", synth.user_ids, synth.sequences, synth.catalog, synth.protocol)
    with pytest.raises(RunError, match="not on 'ml-100k'"):
        check_dataset(cfg, renamed, run)


def test_fingerprint_sees_order_changes(synth: Dataset) -> None:
    seqs = [s.copy() for s in synth.sequences]
    seqs[0][[0, 1]] = seqs[0][[1, 0]]
    swapped = Dataset(synth.name, synth.user_ids, seqs, synth.catalog, synth.protocol)
    assert fingerprint(swapped) != fingerprint(synth)


@pytest.mark.parametrize("name", ["popularity", "itemknn"])
def test_saved_retriever_scores_the_same(tmp_path: Path, synth_split: Split, name: str) -> None:
    model = make_retriever(name).fit(synth_split.train, synth_split.n_items)
    model.save(tmp_path / "model")
    again = load_retriever(tmp_path / "model")
    hist = synth_split.histories("test")[:30]
    np.testing.assert_array_equal(model.score(hist), again.score(hist))
    assert again.params() == model.params()
