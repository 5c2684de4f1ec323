"""Your own data through every command, from two directories; honest run directories around it.

One CSV with other column names and ISO-8601 times plus an items CSV: `palr train` in one directory,
`palr finetune` and `palr recommend --explain --json` from another; the titles show. The same fine-tuned
run then checks the refusals: other settings into the same --out, --out == --run, an incomplete run
recommended or served.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from datetime import UTC, datetime
from pathlib import Path

import pytest

from palr.cli.main import main
from palr.data.synthetic import synthetic_raw

TINY = ["--epochs", "1", "--mini-dim", "32", "--mini-layers", "1", "--mini-vocab", "300", "--positions", "2",
        "--candidates", "20", "--valid-users", "40", "--weight-users", "40", "--pretrain-epochs", "1"]


def palr(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the real entry point in this process; (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def write_shop(d: Path) -> dict[str, str]:
    """inter.csv (customer_id, sku, ts as ISO-8601) and items.csv (sku, name, genres): 80 users, 40 items."""
    raw = synthetic_raw(80, 40, seed=2)
    iso = [datetime.fromtimestamp(1_600_000_000 + 3600 * t, UTC).strftime("%Y-%m-%d %H:%M:%S") for t in raw.times]
    rows = [f"c{u[1:]},sku{i},{t}" for u, i, t in zip(raw.users, raw.items, iso)]
    (d / "inter.csv").write_text("customer_id,sku,ts\n" + "\n".join(rows) + "\n")
    items = sorted(set(raw.items), key=int)
    names = {f"sku{i}": f"Widget number {i}" for i in items}
    (d / "items.csv").write_text("sku,name,genres\n" + "".join(
        f"sku{i},{names[f'sku{i}']},{'red' if int(i) % 2 else 'blue'}|{'big' if int(i) % 3 else 'small'}\n"
        for i in items))
    return names


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("shop")
    a, b = root / "A", root / "B"
    a.mkdir()
    b.mkdir()
    return {"root": root, "A": a, "B": b, "names": write_shop(a)}


def test_own_data_end_to_end_from_two_directories(shop: dict, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(shop["A"])
    code, out, err = palr("train", "--dataset", "csv:inter.csv", "--user-col", "customer_id", "--item-col", "sku",
                          "--time-col", "ts", "--items-file", "items.csv", "--title-col", "name", "--tags-col",
                          "genres", "--retriever", "sasrec", "--param", "epochs=1", "--param", "hidden=32", "--out", "ret", capsys=capsys)
    assert code == 0, err
    args = json.loads((shop["A"] / "ret" / "args.json").read_text())
    assert args["dataset"] == f"csv:{shop['A'] / 'inter.csv'}" and args["items_file"] == str(shop["A"] / "items.csv")
    monkeypatch.chdir(shop["B"])  # everything below runs from another directory
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = palr("finetune", "--run", "../A/ret", "--out", "../A/palr", *TINY, capsys=capsys)
        assert code == 0, err
        assert not re.search(r"\d\.\d{5,}", err + out) and "INFO" not in err, err
        assert "{'" not in out + err, out  # no Trainer log dicts (they go to the run's log file)
        code, out, err = palr("recommend", "--run", "../A/palr", "--user", "c3", "--k", "5", "--explain", "--json",
                              capsys=capsys)
        assert code == 0, err
        assert err == "", err  # no progress bar, no log line, no warning on the console
    # no Python warning on the normal path (ResourceWarning: hidden by Python's defaults; other tests' sockets)
    assert [f"{w.category.__name__}: {w.message}" for w in caught if w.category is not ResourceWarning] == []
    rec = json.loads(out)
    assert len(rec["items"]) == 5
    for it in rec["items"]:
        assert it["title"] == shop["names"][it["item"]]  # titles, not raw ids
        assert "Widget number" in it["explanation"]
    assert "red" in rec["profile"] or "blue" in rec["profile"]  # tags reach the profile
    code, out, err = palr("evaluate", "--run", "../A/ret", "--out", "r.json", capsys=capsys)
    assert code == 0, err


def test_finetune_into_a_run_with_other_settings_is_refused(shop: dict, capsys: pytest.CaptureFixture[str]) -> None:
    palr_run = shop["A"] / "palr"
    if not (palr_run / "run.json").exists():
        pytest.skip("needs the end-to-end run")
    code, _, err = palr("finetune", "--run", str(shop["A"] / "ret"), "--out", str(palr_run), *TINY[:-2],
                        "--pretrain-epochs", "0", capsys=capsys)
    assert code == 2 and "holds a run made with other settings (pretrain_epochs 1 -> 0)" in err
    assert "--overwrite" in err and (palr_run / "run.json").exists()  # the old run is untouched
    code, _, err = palr("finetune", "--run", str(shop["A"] / "ret"), "--out", str(shop["A"] / "ret"), capsys=capsys)
    assert code == 2 and "is the retriever run itself" in err
    assert (shop["A"] / "ret" / "run.json").exists()  # --out == --run once deleted the run's marker


def test_incomplete_run_is_refused_by_recommend_and_serve(shop: dict, capsys: pytest.CaptureFixture[str]) -> None:
    src = shop["A"] / "palr"
    if not (src / "run.json").exists():
        pytest.skip("needs the end-to-end run")
    broken = shop["root"] / "broken"
    shutil.copytree(src, broken)
    (broken / "run.json").unlink()  # as after a kill before the run finished
    for cmd in (["recommend", "--run", str(broken), "--user", "c3"], ["serve", "--run", str(broken), "--port", "1"]):
        code, _, err = palr(*cmd, capsys=capsys)
        assert code == 2 and "is not a complete run (no run.json)" in err and err.count("\n") == 1, err


def test_tuned_run_of_own_data_loads_from_elsewhere(shop: dict, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """palr tune's best run carries the data spec too (it was saved with the default column names)."""
    pytest.importorskip("optuna")
    monkeypatch.chdir(shop["A"])
    code, _, err = palr("tune", "--dataset", "csv:inter.csv", "--user-col", "customer_id", "--item-col", "sku",
                        "--time-col", "ts", "--items-file", "items.csv", "--title-col", "name", "-r", "popularity",
                        "--out", "tuned", "--budget", "60", capsys=capsys)
    assert code == 0, err
    monkeypatch.chdir(shop["B"])
    code, _, err = palr("evaluate", "../A/tuned/best", "--out", "t.json", capsys=capsys)
    assert code == 0, err
