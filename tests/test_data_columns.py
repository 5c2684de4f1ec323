"""Columnar (vectorised) reading: the same values as a row-by-row reference reader, the first bad row in file
order reported by its line, ids kept as codes, preprocessing identical to a row-by-row reference."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from palr.core.errors import DataError
from palr.data.columns import Ids
from palr.data.dataset import id_sort_key
from palr.data.preprocess import preprocess
from palr.data.sources import RawData, free_id, read_ml100k
from palr.data.userfiles import read_user_file


def reference_rows(text: str, user_col: str = "user", item_col: str = "item", time_col: str = "timestamp"):
    """Row by row with Python's csv module: the semantics the columnar reader must reproduce."""
    users, items, times = [], [], []
    for row in csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline="")):
        users.append(free_id(row[user_col]))
        items.append(free_id(row[item_col]))
        v = row[time_col].strip()
        try:
            times.append(float(v))
        except ValueError:
            t = datetime.fromisoformat(v)
            times.append((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp())
    return users, items, times


def test_csv_reader_matches_row_by_row_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = ["\ufeffuser,item,timestamp,note"]
    for r in range(3000):
        u = rng.choice([f"u{rng.integers(50)}", f" {rng.integers(50)} ", f"{rng.integers(50)}.0", f'"x,{rng.integers(5)}"'])
        i = rng.choice([str(rng.integers(200)), f"{rng.integers(200)}.00", f"i{rng.integers(200)}", "007"])
        t = rng.choice([str(int(rng.integers(1e9, 2e9))), f"{rng.integers(1e9, 2e9)}.5", "2024-01-02T03:04:05",
                        "2024-01-02 03:04:05+02:00", " 17 ", "1e9"])
        lines.append(f"{u},{i},{t},\"a\nmulti-line note\"" if r % 97 == 0 else f"{u},{i},{t},n")
        if r % 250 == 0:
            lines.append("")
    text = "\r\n".join(lines) + "\r\n"
    path = tmp_path / "inter.csv"
    path.write_text(text, encoding="utf-8")
    raw = read_user_file(path, "user", "item", "timestamp")
    users, items, times = reference_rows(text)
    assert raw.users.tolist() == users and raw.items.tolist() == items
    np.testing.assert_allclose(raw.times, times, rtol=0, atol=1e-6)
    assert isinstance(raw.users, Ids) and len(raw.users.vocab) < len(users)


def test_first_bad_row_in_file_order_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "inter.csv"
    # a bad time on line 4 comes before a short row on line 6: the time is reported, as row by row
    path.write_text("user,item,timestamp\n1,2,3\n\n1,3,yesterday\n1,4,5\n1,5\n")
    with pytest.raises(DataError, match=r"inter\.csv:4: timestamp is not a number .*'yesterday'"):
        read_user_file(path, "user", "item", "timestamp")
    path.write_text("user,item,timestamp\n1,2,3\n1,5\n1,3,yesterday\n")
    with pytest.raises(DataError, match=r"inter\.csv:3: wrong number of fields"):
        read_user_file(path, "user", "item", "timestamp")
    # an empty id after a quoted multi-line field: the line is the row's last line, as csv.reader counts
    path.write_text('user,item,timestamp,n\n1,2,3,"a\nb"\n ,2,3,x\n')
    with pytest.raises(DataError, match=r"inter\.csv:4: empty user"):
        read_user_file(path, "user", "item", "timestamp")


def test_ml100k_errors_in_file_order(tmp_path: Path) -> None:
    root = tmp_path / "ml-100k"
    root.mkdir()
    (root / "u.item").write_text("1|A (1995)|01-Jan-1995||url" + "|0" * 19 + "\n", encoding="latin-1")
    (root / "u.data").write_text("1\t1\t5\t300\n  \n1\tx\t5\t301\n1\t1\t5\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"u\.data:3: item id is not an integer: 'x'"):
        read_ml100k(root)
    (root / "u.data").write_text("1\t1\t5\t300\r\n1\t1\t5\r\n1\tx\t5\t301\r\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"u\.data:2: expected 4 tab-separated fields .*got 3"):
        read_ml100k(root)
    (root / "u.data").write_text("\ufeff01\t1.0\t5\t300\n", encoding="utf-8")  # a BOM; ids canonical
    raw = read_ml100k(root)
    assert raw.users == ["1"] and raw.items == ["1"]


def reference_preprocess(users: list[str], items: list[str], times: list[float], k: int) -> dict[str, list[str]]:
    """The protocol, row by row: stable time sort, earliest (user, item), iterative k-core, sorted ids."""
    rows = sorted(range(len(users)), key=lambda r: (times[r], r))
    seen, kept = set(), []
    for r in rows:
        if (users[r], items[r]) not in seen:
            seen.add((users[r], items[r]))
            kept.append(r)
    while True:
        uc: dict[str, int] = {}
        ic: dict[str, int] = {}
        for r in kept:
            uc[users[r]] = uc.get(users[r], 0) + 1
            ic[items[r]] = ic.get(items[r], 0) + 1
        nxt = [r for r in kept if uc[users[r]] >= k and ic[items[r]] >= k]
        if len(nxt) == len(kept):
            break
        kept = nxt
    out: dict[str, list[str]] = {}
    for r in kept:
        out.setdefault(users[r], []).append(items[r])
    return dict(sorted(out.items(), key=lambda kv: id_sort_key(kv[0])))


def test_preprocess_matches_row_by_row_reference() -> None:
    rng = np.random.default_rng(1)
    n = 20_000
    users = [f"{x}" if x % 3 else f"u{x}" for x in rng.integers(0, 400, n)]
    items = [str(x) for x in (rng.zipf(1.3, n) % 300)]
    times = rng.integers(0, 50, n).astype(float).tolist()  # heavy ties: file order decides
    ds = preprocess(RawData(users, items, times, {}, {}, "items"), "t", min_count=3)
    want = reference_preprocess(users, items, times, 3)
    assert ds.user_ids == list(want)
    assert ds.catalog.item_ids == sorted({i for s in want.values() for i in s}, key=id_sort_key)
    for u, seq in zip(ds.user_ids, ds.sequences, strict=True):
        assert [ds.catalog.item_ids[i] for i in seq] == want[u]


def test_group_order_is_a_stable_argsort() -> None:
    from palr.data.preprocess import group_order

    rng = np.random.default_rng(3)
    for n_keys in (7, 70_000, 3_000_000):
        keys = rng.integers(0, n_keys, 50_000)
        np.testing.assert_array_equal(group_order(keys, n_keys), np.argsort(keys, kind="stable"))


def test_time_order_is_a_stable_argsort() -> None:
    from palr.data.preprocess import time_order

    rng = np.random.default_rng(4)
    for times in (rng.integers(1_000_000_000, 1_000_000_050, 20_000).astype(float),  # whole seconds, many ties
                  rng.integers(0, 2**40, 20_000).astype(float) - 2**39,  # three radix passes, negative times
                  rng.random(20_000).round(2)):  # fractions: the plain stable sort
        np.testing.assert_array_equal(time_order(times), np.argsort(times, kind="stable"))
