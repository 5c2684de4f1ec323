"""A run directory stands alone: its data snapshot (``RUN/data/``) is all later commands read.

A tiny PALR run moved elsewhere, with no data directory and an empty HOME, still recommends, reports and serves;
loading it reads no raw file; a damaged snapshot, or a run made before snapshots, is one clear line; raw data given
again is checked against the snapshot, never used; config.json has one shape for every run kind; every command
that reads a run takes it as ``--run R`` or positionally.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_own_data import palr  # the real entry point in this process

from palr.core.errors import PalrError, RunError
from palr.data.synthetic import synthetic_dataset
from palr.runs.snapshot import SNAPSHOT_DIR, has_snapshot, load_run_split, load_snapshot, save_snapshot
from palr.runs.store import catalog_fingerprints, fingerprint


def no_raw_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any read of a raw data set fails the test."""
    import palr.data
    import palr.runs.snapshot

    def refuse(*a: object, **kw: object) -> None:
        raise AssertionError(f"a raw data set was read: {a}")

    for module, name in [(palr.data, "read_raw"), (palr.data, "load_dataset"), (palr.data, "load_split"),
                         (palr.runs.snapshot, "load_dataset")]:
        monkeypatch.setattr(module, name, refuse)


def alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No data directory anywhere: PALR_DATA_DIR unset, HOME an empty directory."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("PALR_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(home))


@pytest.fixture
def moved(tiny_ml100k_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tiny PALR run, moved to another directory, with no data directory reachable."""
    src = tmp_path / "made" / "palr"
    shutil.copytree(tiny_ml100k_run["palr"], src)
    dst = tmp_path / "elsewhere" / "moved"
    dst.parent.mkdir()
    shutil.move(src, dst)
    alone(monkeypatch, tmp_path)
    return dst


# ---------------------------------------------------------------------------- the snapshot itself
def test_snapshot_round_trip_keeps_the_data_set_without_pickle(tmp_path: Path) -> None:
    ds = synthetic_dataset(n_users=50, n_items=30, seed=4)
    ds.user_attributes = [{"age": 20 + u % 7, "tags": ("a", "b")} for u in range(ds.n_users)]
    m = save_snapshot(tmp_path / "data", ds)
    assert m.fingerprint == fingerprint(ds) and m.users == 50 and m.items == ds.n_items
    with np.load(tmp_path / "data" / "sequences.npz", allow_pickle=False) as z:
        assert z["items"].dtype == np.int64 and z["offsets"][-1] == ds.n_interactions == len(z["items"])
    back = load_snapshot(tmp_path / "data")
    assert fingerprint(back) == fingerprint(ds) and catalog_fingerprints(back) == catalog_fingerprints(ds)
    assert back.user_ids == ds.user_ids and back.catalog.titles == ds.catalog.titles
    assert back.catalog.kind == ds.catalog.kind and back.protocol == ds.protocol and back.name == ds.name
    assert back.user_attributes[3] == {"age": 23, "tags": ["a", "b"]}
    for a, b in zip(back.sequences, ds.sequences):
        np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.glob(".data.*")), "no temporary folder left behind"


@pytest.mark.parametrize("damage", ["sequences.npz", "catalog.json", "users.json", "manifest.json"])
def test_a_damaged_snapshot_is_one_line_naming_the_file(tiny_ml100k_run: dict[str, Path], tmp_path: Path,
                                                        damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "palr"
    shutil.copytree(tiny_ml100k_run["palr"], run)
    path = run / SNAPSHOT_DIR / damage
    text = path.read_bytes()
    path.unlink()  # hard-linked to the retriever run's: never write through the link
    path.write_bytes(text[:-7] + b"garbage" if damage != "manifest.json" else b"{not json")
    with pytest.raises(RunError, match=f"data snapshot .* is damaged: .*{damage}"):
        load_run_split(run)
    code, _, err = palr("recommend", "--run", str(run), "--user", "1", capsys=capsys)
    assert code == 2 and damage in err and err.count("\n") == 1, err


def test_a_run_made_before_snapshots_is_one_clear_line(tiny_ml100k_run: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "old"
    shutil.copytree(tiny_ml100k_run["palr"], run)
    shutil.rmtree(run / SNAPSHOT_DIR)  # as written by palr before snapshots
    for cmd in (["recommend", "--run", str(run), "--user", "1"], ["report", "--run", str(run), "--out",
                                                                   str(tmp_path / "r.html")]):
        code, _, err = palr(*cmd, capsys=capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"run {run} has no data snapshot (made by an older palr): retrain it" in err


# ---------------------------------------------------------------------------- a run stands alone
def test_a_moved_run_recommends_reports_and_serves_with_no_data(moved: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from palr.serve.app import create_app

    no_raw_reads(monkeypatch)
    code, out, err = palr("recommend", "--run", str(moved), "--user", "1", "--k", "5", "--json", capsys=capsys)
    assert code == 0, err
    items = json.loads(out)["items"]
    assert len(items) == 5 and all(it["title"] and it["title"] != it["item"] for it in items)
    code, out2, err = palr("recommend", str(moved), "--user", "1", "--k", "5", "--json", capsys=capsys)  # positional
    assert code == 0 and json.loads(out2)["items"] == items, err
    code, _, err = palr("report", "--run", str(moved), "--out", str(tmp_path / "r.html"), capsys=capsys)
    assert code == 0, err
    assert "<section>" in (tmp_path / "r.html").read_text()
    with TestClient(create_app(moved)) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["users"] > 0 and health["items"] > 0
        assert client.get("/items", params={"q": "star wars"}).json()["total"] == 1


def test_loading_a_run_reads_no_raw_file(moved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from palr.rank.pipeline import PALR

    no_raw_reads(monkeypatch)
    p = PALR.load(moved)
    assert p.split.dataset.name == "ml-100k" and p.recommend(user="1", k=5).items
    cfg = json.loads((moved / "config.json").read_text())
    assert p.split.dataset.n_users == cfg["dataset"]["users"]


def test_the_palr_run_links_its_retriever_runs_snapshot(tiny_ml100k_run: dict[str, Path]) -> None:
    ret, prun = tiny_ml100k_run["retriever"], tiny_ml100k_run["palr"]
    assert has_snapshot(ret) and has_snapshot(prun)
    for name in ("sequences.npz", "catalog.json", "users.json", "manifest.json"):
        a, b = ret / SNAPSHOT_DIR / name, prun / SNAPSHOT_DIR / name
        assert a.read_bytes() == b.read_bytes()
        assert a.stat().st_ino == b.stat().st_ino  # hard links: one copy on disk


def test_raw_data_given_again_is_checked_not_used(tiny_ml100k_run: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from tiny_runs import write_fake_ml100k

    run = tiny_ml100k_run["palr"]
    code, _, err = palr("recommend", "--run", str(run), "--user", "1", "--data-dir", str(tiny_ml100k_run["data_dir"]),
                        capsys=capsys)
    assert code == 0, err  # the same data set: accepted
    other = write_fake_ml100k(tmp_path / "other", seed=7)  # another data set under the same name
    code, _, err = palr("recommend", "--run", str(run), "--user", "1", "--data-dir", str(other), capsys=capsys)
    assert code == 2 and "was trained on data set 'ml-100k'" in err and err.count("\n") == 1, err
    code, _, err = palr("evaluate", "--run", str(tiny_ml100k_run["retriever"]), "--dataset", "ml-100k",
                        "--data-dir", str(other), "--out", str(tmp_path / "r.json"), capsys=capsys)
    assert code == 2 and "was trained on data set 'ml-100k'" in err, err


# ---------------------------------------------------------------------------- one shape, one way to name a run
def test_config_json_has_one_shape_for_every_run_kind(tiny_ml100k_run: dict[str, Path]) -> None:
    ret = json.loads((tiny_ml100k_run["retriever"] / "config.json").read_text())
    prun = json.loads((tiny_ml100k_run["palr"] / "config.json").read_text())
    keys = {"kind", "config", "data", "inputs", "dataset", "protocol", "snapshot", "versions"}
    assert set(ret) == set(prun) == keys
    assert ret["data"] == prun["data"] and ret["data"]["dataset"] == "ml-100k"
    assert ret["inputs"] == {} and Path(prun["inputs"]["retriever_run"]) == tiny_ml100k_run["retriever"].resolve()
    assert ret["snapshot"] == prun["snapshot"] == SNAPSHOT_DIR


def test_every_command_that_reads_a_run_takes_run_or_a_positional() -> None:
    from palr.core import settings as C
    from palr.core.options import options

    for cls in (C.RecommendConfig, C.ServeConfig, C.EvaluateConfig, C.FinetuneCommand, C.ReportConfig,
                C.ModelExportConfig, C.CompareConfig):
        run = next(o for o in options(cls) if o.name in ("run", "runs"))
        assert "--run" in run.flags or run.flag == "--run", cls.__name__
        assert run.also_positional or cls is C.CompareConfig, cls.__name__  # compare's positionals are A and B


def test_report_takes_several_runs_as_flags_or_positionals(tiny_ml100k_run: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = str(tiny_ml100k_run["palr"])
    code, _, err = palr("report", run, "--run", str(tiny_ml100k_run["retriever"]), "--out", str(tmp_path / "r.html"),
                        capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "r.html").read_text().count("<section>") >= 2


def test_compare_scores_predictions_with_the_runs_snapshot(tiny_ml100k_run: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    run = tiny_ml100k_run["palr"]
    code, _, err = palr("evaluate", "--run", str(run), "--out", str(tmp_path / "e.json"), "--predictions",
                        str(tmp_path / "p.jsonl"), "--retriever-predictions", str(tmp_path / "rp.jsonl"),
                        capsys=capsys)
    assert code == 0, err
    alone(monkeypatch, tmp_path)
    no_raw_reads(monkeypatch)
    code, out, err = palr("compare", str(tmp_path / "p.jsonl"), str(tmp_path / "rp.jsonl"), "--run", str(run),
                          "--json", capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["users"] == json.loads((tmp_path / "e.json").read_text())["protocol"]["test_users"]


def test_feature_run_over_a_csv_run_keeps_its_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`palr finetune --ranker features` over a run of your own CSV: the run reads the retriever run's snapshot
    (columns, items file and all) and keeps the data spec in config.json; moved, it recommends with titles."""
    pytest.importorskip("lightgbm")
    from test_own_data import write_shop

    names = write_shop(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = palr("train", "--dataset", "csv:inter.csv", "--user-col", "customer_id", "--item-col", "sku",
                        "--time-col", "ts", "--items-file", "items.csv", "--title-col", "name", "--tags-col",
                        "genres", "--retriever", "itemknn", "--out", "ret", capsys=capsys)
    assert code == 0, err
    code, _, err = palr("finetune", "ret", "--ranker", "features", "--candidates", "20", "--text-encoder", "tfidf",
                        "--out", "feat", capsys=capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "feat" / "config.json").read_text())
    assert cfg["data"]["user_col"] == "customer_id" and cfg["data"]["items_file"] == str(tmp_path / "items.csv")
    assert json.loads((tmp_path / "feat" / "ranking.json").read_text())["ranker"] == "features"
    dst = tmp_path / "far" / "feat"
    dst.parent.mkdir()
    shutil.move(tmp_path / "feat", dst)
    (tmp_path / "inter.csv").unlink()  # the raw files are gone
    (tmp_path / "items.csv").unlink()
    alone(monkeypatch, tmp_path)
    no_raw_reads(monkeypatch)
    code, out, err = palr("recommend", "--run", str(dst), "--user", "c3", "--k", "5", "--json", capsys=capsys)
    assert code == 0, err
    items = json.loads(out)["items"]
    assert len(items) == 5 and all(it["title"] == names[it["item"]] for it in items)


def test_snapshot_refuses_a_pickled_array(tmp_path: Path) -> None:
    ds = synthetic_dataset(n_users=20, n_items=30, seed=1)
    save_snapshot(tmp_path / "data", ds)
    with pytest.raises((RunError, PalrError)):
        # an object array in place of the sequences (it would need pickle): refused (its sha256 differs too)
        np.savez(tmp_path / "data" / "sequences.npz", items=np.array([object()], dtype=object),
                 offsets=np.array([0, 1]))
        load_snapshot(tmp_path / "data")


def test_a_snapshot_of_another_data_set_is_refused(tiny_ml100k_run: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "palr"
    shutil.copytree(tiny_ml100k_run["palr"], run)
    save_snapshot(run / SNAPSHOT_DIR, synthetic_dataset(n_users=40, n_items=30, seed=9))  # whole, but not its data
    with pytest.raises(RunError, match="is not the data set its config.json names"):
        load_run_split(run)
