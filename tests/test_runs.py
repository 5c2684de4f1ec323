"""Run directories: atomic writes, completeness marker, data set checks, a saved retriever reloads the same."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from palr.core.errors import RunError
from palr.core.io import write_atomic, write_json
from palr.data import Dataset, Split
from palr.data.synthetic import synthetic_dataset
from palr.retrieval.base import load_retriever, make_retriever
from palr.runs.store import begin_run, check_dataset, fingerprint, finish_run, read_run


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


# ---------------------------------------------------------------------------- honest, crash-safe run directories
def _tiny_csv(tmp_path: Path) -> str:
    path = tmp_path / "inter.csv"
    path.write_text("user,item,timestamp\n" + "".join(f"u{u},i{(u + k) % 7},{k}\n" for u in range(7) for k in range(5)))
    return f"csv:{path}"


def test_rerun_into_a_run_with_other_settings(tmp_path: Path) -> None:
    """An existing --out is reused only with the same settings; other settings are refused or --overwrite."""
    from palr.retrieval.load import load_run
    from palr.train.retriever import train_run

    data, out = _tiny_csv(tmp_path), tmp_path / "run"
    train_run(data, "popularity", out, progress=False)
    train_run(data, "popularity", out, progress=False)  # the same settings: rerun in place
    with pytest.raises(RunError, match=r"holds a run made with other settings \(retriever 'popularity' -> "
                                       r"'itemknn'\).*--overwrite"):
        train_run(data, "itemknn", out, progress=False)
    assert read_run(out)["config"]["retriever"] == "popularity"  # untouched
    (out / "model" / "stale.bin").write_bytes(b"old")
    train_run(data, "itemknn", out, progress=False, overwrite=True)
    assert load_run(out)[0]["config"]["retriever"] == "itemknn" and not (out / "model" / "stale.bin").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="unknown or older run"):
        train_run(data, "popularity", foreign, progress=False)


def _write_safetensors(path: Path, n: int = 64) -> None:
    from safetensors.numpy import save_file

    save_file({"w": np.arange(n, dtype=np.float32)}, str(path))


def test_torn_checkpoints_are_skipped_and_removed(tmp_path: Path) -> None:
    """A kill during a Trainer save left a checkpoint that crashed every rerun (SafetensorError)."""
    from palr.train.finetune import _last_checkpoint, checkpoint_complete

    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        d = ckpt / f"checkpoint-{step}"
        d.mkdir(parents=True)
        _write_safetensors(d / "model.safetensors")
        (d / "trainer_state.json").write_text("{}")
    whole = (ckpt / "checkpoint-6" / "model.safetensors").read_bytes()
    (ckpt / "checkpoint-6" / "model.safetensors").write_bytes(whole[: len(whole) - 10])  # torn data
    (ckpt / "checkpoint-4" / "trainer_state.json").unlink()  # killed before the state was written
    assert checkpoint_complete(ckpt / "checkpoint-2") and not checkpoint_complete(ckpt / "checkpoint-6")
    assert _last_checkpoint(ckpt) == ckpt / "checkpoint-2"
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-2"]
    (ckpt / "checkpoint-2" / "model.safetensors").write_bytes(whole[:5])  # torn header
    assert _last_checkpoint(ckpt) is None


def test_directory_build_killed_midway_leaves_no_half_folder(tmp_path: Path) -> None:
    """A process killed (SIGKILL) while writing a model folder leaves the old folder whole; the rerun builds it."""
    import subprocess
    import sys
    import time

    from palr.runs.store import build_dir_atomic

    dst = tmp_path / "base"
    script = ("import sys, time; from pathlib import Path; from palr.runs.store import build_dir_atomic\n"
              "def build(tmp):\n"
              "    tmp.mkdir(); (tmp / 'config.json').write_text('{}'); (tmp / 'model.safetensors').write_bytes(b'x')\n"
              "    time.sleep(60)\n"
              f"build_dir_atomic(Path({str(dst)!r}), build)\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    tmp = tmp_path / ".base.tmp"
    deadline = time.time() + 30
    while not (tmp / "model.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert tmp.exists() and not dst.exists()  # half-written, but only at the temporary sibling

    def build(d: Path) -> None:
        d.mkdir()
        (d / "config.json").write_text('{"ok": 1}')

    build_dir_atomic(dst, build)
    assert json.loads((dst / "config.json").read_text()) == {"ok": 1} and not tmp.exists()
    with pytest.raises(RuntimeError):  # a failing build keeps the previous complete folder
        build_dir_atomic(dst, lambda d: (d.mkdir(), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert json.loads((dst / "config.json").read_text()) == {"ok": 1}


def test_damaged_base_model_is_rebuilt(tmp_path: Path, synth_split: Split) -> None:
    """A half-written base/ (from a kill in an older palr) made every rerun crash; now it is rebuilt."""
    from palr.core.settings import FinetuneConfig, MiniConfig
    from palr.train.lm import build_base

    cfg = FinetuneConfig(mini=MiniConfig(vocab=300, dim=32, layers=1), init_from_retriever=False).resolved()
    build_base(cfg, synth_split, tmp_path, None)
    weights = tmp_path / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    model, _ = build_base(cfg, synth_split, tmp_path, None)
    assert model.config.hidden_size == 32 and (tmp_path / "base" / "model.safetensors").stat().st_size > 1000
