"""The command line: every command's --help renders; bad input exits 2 with a clear message and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from palr.cli.main import app, parse_params
from palr.core.errors import PalrError


def command_paths(command: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command of the app, found from the app itself (new commands are covered).

    typer vendors its own click, so groups are recognised by their ``commands`` mapping.
    """
    paths = [prefix]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        paths += command_paths(sub, (*prefix, name))
    return paths


PATHS = command_paths(typer.main.get_command(app))


def test_the_app_has_the_foundation_commands() -> None:
    assert {("evaluate",), ("train",), ("data",), ("data", "stats"), ("data", "download")} <= set(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "palr")
def test_help_renders(path: tuple[str, ...]) -> None:
    res = CliRunner().invoke(app, [*path, "--help"], terminal_width=120)
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and "--help" in res.output


def run_palr(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real entry point (main() turns PalrError into exit code 2), in a fresh interpreter."""
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("PALR_DATA_DIR", None)
    return subprocess.run([sys.executable, "-c", "from palr.cli import main; main()", *args], check=False, cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_malformed_file_exits_2_with_file_and_line_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "inter.csv"
    bad.write_text("user,item,timestamp\nu1,i1,1\nu1,i2,2\nu1,i3,not-a-time\nu1,i4,4\n")
    res = run_palr("evaluate", "--dataset", f"csv:{bad}", "--retriever", "popularity", "--out", "r.json",
                   "--predictions", "p.jsonl", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert f"{bad}:4" in res.stderr and "timestamp is not a number" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "p.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["inter.csv"]  # no temporary files either


def test_unknown_names_exit_2(tmp_path: Path) -> None:
    res = run_palr("data", "stats", "--dataset", "netflix", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 2 and "known: ml-100k" in res.stderr
    res = run_palr("data", "stats", "--dataset", "ml-1m", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 2
    assert str(tmp_path / "ml-1m" / "ratings.dat") in res.stderr and "palr data download ml-1m" in res.stderr


def test_download_offline_names_the_files_to_place(tmp_path: Path) -> None:
    res = run_palr("data", "download", "ml-100k", "--data-dir", str(tmp_path), "--timeout", "2", cwd=tmp_path,
                   timeout=60)
    if res.returncode == 0:
        pytest.skip("this machine is online: the download worked")
    assert res.returncode == 2, res.stderr
    msg = " ".join(res.stderr.split())
    assert f"place these files in {tmp_path / 'ml-100k'}/" in msg
    for name in ("u.data", "u.item", "u.user"):
        assert name in msg
    assert not (tmp_path / "ml-100k").exists()


def test_download_unknown_name(tmp_path: Path) -> None:
    res = run_palr("data", "download", "netflix", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert res.returncode == 2 and "no download source for 'netflix'" in res.stderr


def test_data_stats_json_on_csv(tmp_path: Path) -> None:
    rows = ["user,item,timestamp"] + [f"u{u},i{(u + k) % 7},{k}" for u in range(7) for k in range(5)]
    (tmp_path / "inter.csv").write_text("\n".join(rows) + "\n")
    res = CliRunner().invoke(app, ["data", "stats", "--dataset", f"csv:{tmp_path / 'inter.csv'}", "--json"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.output)
    assert (stats["users"], stats["items"], stats["interactions"]) == (7, 7, 35)
    (tmp_path / "few.csv").write_text("user,item,timestamp\nu1,i1,1\nu1,i2,2\n")
    res = run_palr("data", "stats", "--dataset", f"csv:{tmp_path / 'few.csv'}", cwd=tmp_path)
    assert res.returncode == 2 and "nothing survives 5-core" in res.stderr


def test_data_stats_json_real(data_dir_real: Path) -> None:
    if not (data_dir_real / "ml-100k").is_dir():
        pytest.skip("ml-100k is not in the data directory")
    res = CliRunner().invoke(app, ["data", "stats", "--dataset", "ml-100k", "--data-dir", str(data_dir_real), "--json"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.output)
    assert {"dataset", "users", "items", "interactions", "density", "sequence_length", "protocol"} <= set(stats)
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1349, 99287)
    assert set(stats["sequence_length"]) == {"min", "mean", "median", "max"}


def test_parse_params() -> None:
    assert parse_params(["lr=0.001", "layers=2", "causal=true", "name=abc", "s=[1, 2]"]) == {
        "lr": 0.001, "layers": 2, "causal": True, "name": "abc", "s": [1, 2]}
    assert parse_params(None) == {}
    with pytest.raises(PalrError, match="key=value"):
        parse_params(["lr"])


def test_readme_and_ci_share_the_test_command() -> None:
    root = Path(__file__).resolve().parents[1]
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    ci_cmd = next(line.split('"')[1] for line in ci.splitlines() if line.startswith("TEST_CMD="))
    setup = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '.[all]'"
    assert f"{setup} && {ci_cmd}\n" in readme
    assert f"{setup} && PALR_DATA_DIR=../shared/data palr demo\n" in readme
    assert "pip install --quiet torch==2.13.0" in ci and "pip install --quiet -e '.[all]'" in ci


def test_csv_column_flags(tmp_path: Path) -> None:
    # file order differs from time order for u0: with --time-col ts the order follows ts, with '' the file
    rows = ["uid;iid;ts".replace(";", ",")]
    rows += [f"u{u},i{(u + k) % 7},{(5 - k) if u == 0 else k}" for u in range(7) for k in range(5)]
    (tmp_path / "inter.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "items.csv").write_text("iid,title,genres\n" + "".join(f"i{i},Thing {i},A|B\n" for i in range(7)))
    base = ["--dataset", f"csv:{tmp_path / 'inter.csv'}", "--user-col", "uid", "--item-col", "iid"]
    runner = CliRunner()
    res = runner.invoke(app, ["data", "stats", *base, "--time-col", "ts", "--items-file", str(tmp_path / "items.csv"),
                              "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["interactions"] == 35
    for time_col, first_pred_excludes in (("ts", "i4"), ("", "i0")):
        preds = tmp_path / f"p{time_col}.jsonl"
        res = runner.invoke(app, ["evaluate", *base, "--time-col", time_col, "--retriever", "popularity",
                                  "--out", str(tmp_path / "r.json"), "--predictions", str(preds)])
        assert res.exit_code == 0, res.output
        doc = json.loads((tmp_path / "r.json").read_text())
        assert ("timestamp" in doc["protocol"]["order"]) == bool(time_col)
        # u0's test target is the last item in time order (i0 by ts, i4 in file order); with 7 items and a
        # 4-item history the remaining 3 items are predicted, never the history
        first = json.loads(preds.read_text().splitlines()[0])
        assert first["user"] == "u0" and first_pred_excludes not in first["items"]
    res = runner.invoke(app, ["data", "stats", *base[:2], "--json"])
    assert res.exit_code != 0 and "missing column" in str(res.exception)


def test_demo_trains_its_retriever_with_palr_train_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`palr demo` trained SASRec with its own settings (200 epochs, patience 5), not `palr train`'s."""
    import dataclasses

    from test_evaluation import write_synthetic_csv

    import palr.train.retriever
    from palr.cli.demo import QUICK_RETRIEVER, run_demo

    seen: list[tuple[tuple, dict]] = []

    class Stop(Exception):
        pass

    def capture(*args, **kwargs):
        seen.append((args, kwargs))
        raise Stop

    data = f"csv:{write_synthetic_csv(tmp_path / 'events.csv')}"
    monkeypatch.setattr(palr.train.retriever, "train_run", capture)
    r = CliRunner().invoke(app, ["train", "-d", data, "--out", str(tmp_path / "t")])
    assert isinstance(r.exception, Stop), r.output
    with pytest.raises(Stop):
        run_demo(data, tmp_path / "demo", console=Console(quiet=True))
    with pytest.raises(Stop):
        run_demo(data, tmp_path / "demo", quick=True, console=Console(quiet=True))
    (train_args, _), (full_args, _), (quick_args, _) = seen
    train_cfg, full, quick = train_args[0], full_args[0], quick_args[0]
    assert full == dataclasses.replace(train_cfg, out=tmp_path / "demo" / "retriever")  # the same settings
    assert full.retriever == "sasrec" and full.params == {}  # SASRec's own (data-filled) defaults
    assert quick == dataclasses.replace(full, params=QUICK_RETRIEVER) and QUICK_RETRIEVER["epochs"] < 50


def test_demo_console_names_what_ranked(tiny_ml100k_run: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's table has a "ranked by" column and a "PALR ranked by" line (the tiny runs stand in for training)."""
    import json

    import palr.train.finetune
    import palr.train.retriever
    from palr.cli.demo import run_demo

    monkeypatch.setattr(palr.train.retriever, "train_run", lambda cfg, progress=True: tiny_ml100k_run["retriever"])
    monkeypatch.setattr(palr.train.finetune, "finetune", lambda *a, **k: tiny_ml100k_run["palr"])
    con = Console(record=True, width=200)
    run_demo("ml-100k", tmp_path / "demo", data_dir=tiny_ml100k_run["data_dir"], users=1, console=con)
    text = con.export_text()
    doc = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert "ranked by" in text
    assert f"PALR ranked by: {doc['protocol']['ranked_by']}" in text
