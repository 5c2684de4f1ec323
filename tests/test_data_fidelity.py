"""Data fidelity: what is read is what is in the file (BOM, integer ids, whole floats, ISO times, items files,
the catalogue in the fingerprint), and error messages print literally."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from palr.core.errors import DataError, RunError
from palr.data import DataSpec, load_dataset, read_raw
from palr.data.sources import read_ml1m, read_ml100k
from palr.data.userfiles import read_user_file

GENRES = "unknown|0\nAction|1\nComedy|2\n"


def write_ml100k(root: Path, data: str, items: int = 6, encoding: str = "latin-1") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_bytes(data.encode(encoding))
    (root / "u.genre").write_text(GENRES)
    (root / "u.item").write_text("".join(f"{i}|Film {i} (1995)|01-Jan-1995||http://x|0|1|0\n"
                                         for i in range(1, items + 1)))
    return root


def full_grid(users: int = 6, items: int = 6) -> str:
    return "".join(f"{u}\t{i}\t4\t{100 * u + i}\n" for u in range(1, users + 1) for i in range(1, items + 1))


def test_bom_is_stripped(tmp_path: Path) -> None:
    """A UTF-8 BOM before u.data once made user '196' into '\\ufeff196' (and dropped it in the 5-core)."""
    plain = load_dataset("ml-100k", write_ml100k(tmp_path / "a" / "ml-100k", full_grid()).parent)
    bom = load_dataset("ml-100k", write_ml100k(tmp_path / "b" / "ml-100k", "\ufeff" + full_grid(),
                                               encoding="utf-8").parent)
    assert bom.user_ids == plain.user_ids == ["1", "2", "3", "4", "5", "6"]
    assert bom.n_interactions == plain.n_interactions == 36


def test_movielens_ids_are_checked_integers(tmp_path: Path) -> None:
    """'0242' and '242' are one item; a non-integer id is a file:line error."""
    root = write_ml100k(tmp_path / "ml-100k", "1\t02\t4\t1\n1\t2\t4\t2\n2\t2.0\t4\t3\n")
    raw = read_ml100k(root)
    assert raw.items == ["2", "2", "2"]
    write_ml100k(root, "1\t2\t4\t1\n1\tx2\t4\t2\n")
    with pytest.raises(DataError, match=r"u\.data:2: item id is not an integer: 'x2'"):
        read_ml100k(root)
    (root / "u.item").write_text("01|Film (1995)|01-Jan-1995||http://x|0|1|0\n")
    write_ml100k(root, "1\t1\t4\t1\n", items=0)
    (root / "u.item").write_text("01|Film (1995)|01-Jan-1995||http://x|0|1|0\n")
    assert read_ml100k(root).titles == {"1": "Film (1995)"}
    m1 = tmp_path / "ml-1m"
    m1.mkdir()
    (m1 / "ratings.dat").write_text("1::007::5::10\n")
    (m1 / "movies.dat").write_text("7::Bond (1962)::Action\n")
    raw = read_ml1m(m1)
    assert raw.items == ["7"] and raw.titles == {"7": "Bond (1962)"}


def test_integral_floats_are_integers(tmp_path: Path) -> None:
    """A Parquet id column of floats gave ids '1.0' in predictions; CSV '3.0' and '3' were two users."""
    path = tmp_path / "inter.parquet"
    pd.DataFrame({"user": [1.0, 1.0, 2.0], "item": [10, 20, 10], "timestamp": [1, 2, 3]}).to_parquet(path)
    raw = read_user_file(path, "user", "item", "timestamp")
    assert raw.users == ["1", "1", "2"] and raw.items == ["10", "20", "10"]
    pd.DataFrame({"user": [1.5, 1.0], "item": [10, 20], "timestamp": [1, 2]}).to_parquet(path)
    with pytest.raises(DataError, match="row 1: user is not a whole number"):
        read_user_file(path, "user", "item", "timestamp")
    csv = tmp_path / "inter.csv"
    csv.write_text("user,item,timestamp\n3.0,a,1\n3,b,2\nu1,c.0,3\n")
    raw = read_user_file(csv, "user", "item", "timestamp")
    assert raw.users == ["3", "3", "u1"] and raw.items == ["a", "b", "c.0"]


def test_csv_takes_iso_times(tmp_path: Path) -> None:
    csv = tmp_path / "inter.csv"
    csv.write_text("user,item,ts\nu,b,1997-12-04 15:55:49\nu,a,1997-12-04T15:55:48Z\nu,c,881250950\n")
    raw = read_user_file(csv, "user", "item", "ts")
    assert list(raw.times) == [881250949.0, 881250948.0, 881250950.0]
    csv.write_text("user,item,ts\nu,b,1997-13-04\n")
    with pytest.raises(DataError, match=r"inter\.csv:2: ts is not a number \(epoch seconds\) or an ISO-8601 time"):
        read_user_file(csv, "user", "item", "ts")
    pq = tmp_path / "inter.parquet"
    pd.DataFrame({"user": ["u", "u"], "item": ["a", "b"], "ts": ["1997-12-04 15:55:49", "881250950"]}).to_parquet(pq)
    assert list(read_user_file(pq, "user", "item", "ts").times) == [881250949.0, 881250950.0]


def test_items_file_must_match(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inter = tmp_path / "inter.csv"
    inter.write_text("user,item,timestamp\n" + "".join(f"u{u},{i},{u * 10 + i}\n" for u in range(3) for i in range(4)))
    items = tmp_path / "items.csv"
    items.write_text("item,title\n" + "".join(f"m{i},Movie {i}\n" for i in range(4)))
    with pytest.raises(DataError, match=r"items\.csv: none of its 4 item ids matches an item of the interactions"):
        read_user_file(inter, "user", "item", "timestamp", items)
    items.write_text("item,title\n0,Zero\n1,One\n")
    with caplog.at_level(logging.WARNING):
        raw = read_user_file(inter, "user", "item", "timestamp", items)
    assert "describes 2 of the 4 interaction items (50.0%)" in caplog.text
    assert raw.titles == {"0": "Zero", "1": "One"}
    # a Parquet items file, with other column names
    pq = tmp_path / "items.parquet"
    pd.DataFrame({"sku": [0, 1, 2, 3], "name": ["A", "B", "C", "D"], "kind": ["x|y", "y", None, "x"],
                  "price": [1.5, 2.0, None, 3.0]}).to_parquet(pq)
    raw = read_raw(f"csv:{inter}", tmp_path, items_file=pq, title_col="name", tags_col="kind")
    assert raw.titles == {"0": "A", "1": "B", "2": "C", "3": "D"}
    assert raw.attributes["0"] == {"genres": ["x", "y"], "price": 1.5}  # the id column (sku) is no attribute
    assert raw.attributes["2"] == {}


def test_fingerprint_covers_the_catalogue(tmp_path: Path) -> None:
    """Raw data given again with a run is refused when the catalogue's titles or attributes changed (the prompts
    learned them); the run itself reads its own snapshot, so an edited items file never changes what it loads."""
    from palr.retrieval.load import load_run
    from palr.train.retriever import train_run

    inter = tmp_path / "inter.csv"
    inter.write_text("user,item,timestamp\n" + "".join(f"u{u},i{(u + k) % 7},{k}\n" for u in range(7) for k in range(5)))
    items = tmp_path / "items.csv"
    items.write_text("item,title,genres\n" + "".join(f"i{i},Thing {i},A|B\n" for i in range(7)))
    run = train_run(DataSpec(f"csv:{inter}", items_file=items), "popularity", tmp_path / "run", progress=False)
    load_run(run, data_dir=tmp_path)  # unchanged: accepted
    items.write_text("item,title,genres\n" + "".join(f"i{i},Renamed {i},A|B\n" for i in range(7)))
    assert load_run(run)[2].dataset.catalog.titles[0] == "Thing 0"  # the snapshot, not the edited file
    with pytest.raises(RunError, match=r"catalogue .* changed since the run was trained \(item titles differ\)"):
        load_run(run, data_dir=tmp_path)
    items.write_text("item,title,genres\n" + "".join(f"i{i},Thing {i},C\n" for i in range(7)))
    with pytest.raises(RunError, match=r"item attributes differ"):
        load_run(run, data_dir=tmp_path)


def test_error_messages_print_literally(tmp_path: Path) -> None:
    """rich markup turned 'u.item:100:' into an emoji; errors are plain text now."""
    root = write_ml100k(tmp_path / "ml-100k", full_grid(), items=99)
    with open(root / "u.item", "a") as fh:
        fh.write("100|Bad line\n")
    env = {**os.environ, "COLUMNS": "60"}
    env.pop("PALR_DATA_DIR", None)
    res = subprocess.run([sys.executable, "-c", "from palr.cli import main; main()", "data", "stats", "--dataset",
                          "ml-100k", "--data-dir", str(tmp_path)], capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 2
    assert res.stderr == f"error: {root / 'u.item'}:100: expected 8 '|'-separated fields, got 2\n"
