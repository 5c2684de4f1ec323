"""Data: readers for every layout, bad input, the canonical preprocessing, leave-one-out, real-data counts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from palr.core.errors import DataError, MissingDataError
from palr.data import Split, load_dataset, read_raw
from palr.data.dataset import id_sort_key
from palr.data.preprocess import k_core, preprocess
from palr.data.sources import RawData, read_amazon, read_ml1m, read_ml100k, read_ml_latest
from palr.data.userfiles import read_user_file


def raw_of(rows: list[tuple[str, str, float]]) -> RawData:
    users, items, times = zip(*rows, strict=True)
    return RawData(list(users), list(items), [float(t) for t in times], {}, {}, "items")


def seq_ids(ds, user: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [ds.catalog.item_ids[i] for i in ds.sequences[ds.user_index(user)]]


# ---------------------------------------------------------------------------- preprocessing
def test_dedupe_keeps_earliest_occurrence() -> None:
    # "x" occurs twice; its earliest occurrence (t=1) is later in the file than the t=5 one
    ds = preprocess(raw_of([("a", "x", 5), ("a", "y", 3), ("a", "x", 1), ("a", "z", 9)]), "t", min_count=1)
    assert seq_ids(ds, "a") == ["x", "y", "z"]
    assert ds.n_interactions == 3


def test_dedupe_equal_times_keeps_file_order() -> None:
    ds = preprocess(raw_of([("a", "y", 2), ("a", "x", 2), ("a", "y", 2), ("a", "z", 2)]), "t", min_count=1)
    assert seq_ids(ds, "a") == ["y", "x", "z"]


def test_stable_time_sort_never_by_item_id() -> None:
    # equal timestamps: file order 30, 4, 200 must survive; numeric id order would give 4, 30, 200 and
    # string order 200, 30, 4
    rows = [("u", "30", 100), ("u", "4", 100), ("u", "200", 100), ("u", "1", 50), ("u", "7", 150)]
    ds = preprocess(raw_of(rows), "t", min_count=1)
    assert seq_ids(ds, "u") == ["1", "30", "4", "200", "7"]


def test_stable_time_sort_randomised_against_reference() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(30):
        items = rng.permutation(200)[:40]
        times = rng.integers(0, 5, size=40)  # many ties
        rows += [(f"u{u}", str(it), float(t)) for it, t in zip(items, times, strict=True)]
    perm = rng.permutation(len(rows))  # interleave users in the file
    rows = [rows[i] for i in perm]
    ds = preprocess(raw_of(rows), "t", min_count=1)
    for u in range(30):
        mine = [(t, pos, it) for pos, (uu, it, t) in enumerate(rows) if uu == f"u{u}"]
        want = [it for _, _, it in sorted(mine)]
        assert seq_ids(ds, f"u{u}") == want


def test_iterative_five_core_needs_several_rounds() -> None:
    block = [(f"U{u}", f"I{i}") for u in range(1, 6) for i in range(1, 6)]  # a complete 5 x 5 block
    # U6 has 5 items, one of which (J) nobody else has: round 1 drops J, round 2 drops U6 (4 items left),
    # round 3 drops I6 (U1..U4 + U6 = 5 users, 4 after U6 left).
    extra = [("U6", "I1"), ("U6", "I2"), ("U6", "I3"), ("U6", "J"), ("U6", "I6")]
    extra += [(f"U{u}", "I6") for u in range(1, 5)]
    pairs = block + extra
    ds = preprocess(raw_of([(u, i, t) for t, (u, i) in enumerate(pairs)]), "t", min_count=5)
    assert ds.user_ids == ["U1", "U2", "U3", "U4", "U5"]
    assert ds.catalog.item_ids == ["I1", "I2", "I3", "I4", "I5"]
    assert ds.n_interactions == 25
    users = np.array([int(u[1:]) for u, _ in pairs])
    # a fixed code per item name (hash(i) % 1000 depended on PYTHONHASHSEED: two names could collide)
    code = {name: k for k, name in enumerate(sorted({i for _, i in pairs}))}
    items = np.array([code[i] for _, i in pairs])
    assert k_core(users, items, 5).sum() == 25
    # a single pass (users and items filtered once) would keep U6 with 4 items: make sure the reference
    # data really needs the second round
    ucnt = pd.Series(users).value_counts()
    icnt = pd.Series(items).value_counts()
    single = (pd.Series(users).map(ucnt) >= 5) & (pd.Series(items).map(icnt) >= 5)
    assert single.sum() > 25


def test_sorted_id_maps_numeric_ids_numerically() -> None:
    rows = [("10", "100", 1), ("9", "9", 2), ("10", "a", 3), ("2", "10", 4), ("9", "100", 5)]
    ds = preprocess(raw_of(rows), "t", min_count=1)
    assert ds.user_ids == ["2", "9", "10"]
    assert ds.catalog.item_ids == ["9", "10", "100", "a"]
    assert sorted(["b", "10", "9", "a", "0100"], key=id_sort_key) == ["9", "10", "0100", "a", "b"]
    assert sorted(["1", "01", "²"], key=id_sort_key) == ["01", "1", "²"]
    assert sorted(["01", "1"], key=id_sort_key) == ["01", "1"]


def test_leave_one_out(synth_split: Split) -> None:
    ds = synth_split.dataset
    assert synth_split.histories("valid") is synth_split.train
    for u, seq in enumerate(ds.sequences):
        train, valid, test = synth_split.train[u], synth_split.valid_targets[u], synth_split.test_targets[u]
        assert train.tolist() + [valid, test] == seq.tolist()
        assert valid not in train
        assert test not in synth_split.histories("test")[u]
        assert synth_split.histories("test")[u].tolist() == train.tolist() + [valid]
        assert synth_split.targets("test")[u] == test and synth_split.targets("valid")[u] == valid
    with pytest.raises(ValueError, match="stage"):
        synth_split.histories("train")  # type: ignore[arg-type]


def test_leave_one_out_needs_three_items() -> None:
    ds = preprocess(raw_of([("a", "x", 1), ("a", "y", 2)]), "t", min_count=1)
    with pytest.raises(ValueError, match="at least 3"):
        Split.leave_one_out(ds)


def test_synthetic_is_deterministic(synth) -> None:  # type: ignore[no-untyped-def]
    from palr.data.synthetic import synthetic_dataset

    again = synthetic_dataset(n_users=200, n_items=120, seed=0)
    assert again.user_ids == synth.user_ids
    assert all(np.array_equal(a, b) for a, b in zip(again.sequences, synth.sequences, strict=True))
    assert min(len(s) for s in synth.sequences) >= 5


# ---------------------------------------------------------------------------- MovieLens readers
def write_ml100k(root: Path, data_lines: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text("\n".join(data_lines) + "\n", encoding="latin-1")
    (root / "u.genre").write_text("unknown|0\nAction|1\nComedy|2\n\n", encoding="latin-1")
    (root / "u.item").write_bytes(
        "1|Misérables, Les (1995)|01-Jan-1995||http://x|0|1|1\n"
        "2|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n".encode("latin-1"))
    (root / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    return root


def test_read_ml100k(tmp_path: Path) -> None:
    root = write_ml100k(tmp_path / "ml-100k", ["1\t2\t5\t300", "2\t1\t3\t200", "1\t1\t4\t300"])
    raw = read_ml100k(root)
    assert raw.users == ["1", "2", "1"] and raw.items == ["2", "1", "1"] and raw.times.tolist() == [300.0, 200.0, 300.0]
    assert raw.titles["1"] == "Misérables, Les (1995)"
    assert raw.attributes["1"] == {"genres": ["Action", "Comedy"], "year": 1995}
    assert raw.attributes["2"]["genres"] == ["Comedy"]
    assert raw.user_attributes["2"] == {"age": 53, "gender": "F", "occupation": "other"}
    ds = preprocess(raw, "ml-100k", min_count=1)
    assert seq_ids(ds, "1") == ["2", "1"]  # equal timestamps keep file order
    assert ds.catalog.kind == "movies"


def test_ml100k_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    root = write_ml100k(tmp_path / "ml-100k", ["1\t2\t5\t300", "", "2\t1\tfive\t200"])
    with pytest.raises(DataError) as e:
        read_ml100k(root)
    assert e.value.line == 3 and e.value.path == str(root / "u.data")
    assert f"{root / 'u.data'}:3" in str(e.value) and "rating" in str(e.value)
    root = write_ml100k(tmp_path / "b" / "ml-100k", ["1\t2\t5\t300", "2\t1\t200"])
    with pytest.raises(DataError, match=r"u\.data:2: expected 4"):
        read_ml100k(root)


def test_ml100k_bad_user_file_is_data_error(tmp_path: Path) -> None:
    root = write_ml100k(tmp_path / "ml-100k", ["1\t2\t5\t300"])
    (root / "u.user").write_text("1|24|M|technician|85711\n2|old|F|other|94043\n")
    with pytest.raises(DataError, match=r"u\.user:2"):
        read_ml100k(root)


def test_read_ml1m(tmp_path: Path) -> None:
    root = tmp_path / "ml-1m"
    root.mkdir()
    (root / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    (root / "movies.dat").write_bytes("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                                      "661::Café au lait (1993)::Comedy|Drama\n".encode("latin-1"))
    (root / "users.dat").write_text("1::F::1::10::48067\n")
    raw = read_ml1m(root)
    assert raw.items == ["1193", "661"] and raw.times.tolist() == [978300760.0, 978302109.0]
    assert raw.titles["661"] == "Café au lait (1993)"
    assert raw.attributes["661"] == {"genres": ["Comedy", "Drama"], "year": 1993}
    assert raw.user_attributes["1"]["gender"] == "F"
    (root / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3\n")
    with pytest.raises(DataError, match=r"ratings\.dat:2"):
        read_ml1m(root)


def test_read_ml_latest_quoted_title(tmp_path: Path) -> None:
    root = tmp_path / "ml-latest-small"
    root.mkdir()
    (root / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,11,4.0,964982703\n1,1,4.0,964981247\n")
    (root / "movies.csv").write_text('movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n'
                                     '11,"American President, The (1995)",Comedy|Drama|Romance\n'
                                     '12,Empty (2000),(no genres listed)\n')
    raw = read_ml_latest(root)
    assert raw.titles["11"] == "American President, The (1995)"
    assert raw.attributes["11"] == {"genres": ["Comedy", "Drama", "Romance"], "year": 1995}
    assert raw.attributes["12"]["genres"] == []
    ds = preprocess(raw, "ml-latest-small", min_count=1)
    assert seq_ids(ds, "1") == ["1", "11"]


def test_ml_latest_malformed_csv_line_numbers(tmp_path: Path) -> None:
    root = tmp_path / "ml-latest-small"
    root.mkdir()
    (root / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation\n")
    (root / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1\n1,2,4.0,2\n1,3,4.0\n")
    with pytest.raises(DataError) as e:
        read_ml_latest(root)
    assert e.value.line == 4 and e.value.path.endswith("ratings.csv")
    (root / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1\n1,2,4.0,yesterday\n")
    with pytest.raises(DataError, match=r"ratings\.csv:3: timestamp is not a number"):
        read_ml_latest(root)
    (root / "ratings.csv").write_text("user,movieId,rating,timestamp\n1,1,4.0,1\n")
    with pytest.raises(DataError, match=r"ratings\.csv:1: missing column"):
        read_ml_latest(root)
    (root / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1\n1,2,4.0,nan\n")
    with pytest.raises(DataError, match=r"ratings\.csv:3"):
        read_ml_latest(root)


def test_csv_with_bom_and_bad_encoding(tmp_path: Path) -> None:
    root = tmp_path / "ml-latest-small"
    root.mkdir()
    (root / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation\n")
    (root / "ratings.csv").write_bytes(b"\xef\xbb\xbfuserId,movieId,rating,timestamp\n1,1,4.0,1\n")
    assert read_ml_latest(root).users == ["1"]
    (root / "ratings.csv").write_bytes(b"userId,movieId,rating,timestamp\n1,1,4.0,1\n1,\xff\xfe,4.0,2\n")
    with pytest.raises(DataError, match=r"ratings\.csv: not valid utf-8"):
        read_ml_latest(root)


# ---------------------------------------------------------------------------- Amazon readers
def test_read_amazon_sequence_form(tmp_path: Path) -> None:
    root = tmp_path / "amazon-beauty"
    root.mkdir()
    (root / "user_sequence.txt").write_text("A1 B3 B1 B2\nA2 B2 B3\n")
    (root / "item_titles.tsv").write_text("asin\ttitle\nB1\tTom &amp; Jerry&#39;s Soap\nB2\tLotion\nB3\tNail\n")
    (root / "item_categories.tsv").write_text(
        'asin\tcategories_json\nB1\t[["Beauty", "Bath & Body", "Soap"]]\nB2\t[["Beauty", "Skin"]]\n')
    raw = read_amazon(root, "amazon-beauty")
    assert raw.times is None and raw.users == ["A1", "A1", "A1", "A2", "A2"]
    assert raw.titles["B1"] == "Tom & Jerry's Soap"
    assert raw.attributes["B1"] == {"categories": ["Bath & Body", "Soap"]}
    ds = preprocess(raw, "amazon-beauty", min_count=1)
    assert seq_ids(ds, "A1") == ["B3", "B1", "B2"]  # the file order is the time order
    assert ds.catalog.kind == "products" and "file order" in ds.protocol["order"]
    (root / "item_categories.tsv").write_text('asin\tcategories_json\nB1\t[["Beauty"]]\nB2\t[["Beauty", \n')
    with pytest.raises(DataError, match=r"item_categories\.tsv:3: categories are not valid JSON"):
        read_amazon(root, "amazon-beauty")
    (root / "user_sequence.txt").write_bytes(b"A1 B3 B1 B2\nA2 \xff\n")
    with pytest.raises(DataError, match=r"user_sequence\.txt: not valid utf-8"):
        read_amazon(root, "amazon-beauty")
    (root / "user_sequence.txt").write_text("A1 B3 B1 B2\nA2\n")
    with pytest.raises(DataError, match=r"user_sequence\.txt:2"):
        read_amazon(root, "amazon-beauty")


def write_gz(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def ucsd_reviews() -> list[str]:
    return [json.dumps({"reviewerID": "R1", "asin": "B2", "unixReviewTime": 200, "overall": 5.0}),
            json.dumps({"reviewerID": "R1", "asin": "B1", "unixReviewTime": 100}),
            json.dumps({"reviewerID": "R2", "asin": "B1", "unixReviewTime": 100})]


def test_read_amazon_ucsd(tmp_path: Path) -> None:
    root = tmp_path / "amazon-beauty"
    root.mkdir()
    write_gz(root / "reviews_Beauty_5.json.gz", ucsd_reviews())
    write_gz(root / "meta_Beauty.json.gz", [
        "{'asin': 'B1', 'title': 'Tom &amp; Jerry Soap', 'categories': [['Beauty', 'Bath & Body']]}",
        "{'asin': 'B2', 'title': \"L'Oreal Lotion\", 'categories': [['Beauty']], 'price': 3.5}",
        "{'asin': 'B9', 'title': 'not reviewed'}",
    ])
    raw = read_amazon(root, "amazon-beauty")
    assert raw.users == ["R1", "R1", "R2"] and raw.times.tolist() == [200.0, 100.0, 100.0]
    assert raw.titles == {"B1": "Tom & Jerry Soap", "B2": "L'Oreal Lotion"}
    assert raw.attributes["B1"] == {"categories": ["Bath & Body"]}
    assert raw.attributes["B2"] == {"categories": ["Beauty"]}
    ds = preprocess(raw, "amazon-beauty", min_count=1)
    assert seq_ids(ds, "R1") == ["B1", "B2"]


def test_amazon_meta_code_is_never_run(tmp_path: Path) -> None:
    root = tmp_path / "amazon-beauty"
    root.mkdir()
    marker = tmp_path / "pwned"
    write_gz(root / "reviews_Beauty_5.json.gz", ucsd_reviews())
    write_gz(root / "meta_Beauty.json.gz", [
        "{'asin': 'B1', 'title': 'ok'}",
        f"__import__('os').system('echo pwned > {marker}')",
    ])
    with pytest.raises(DataError) as e:
        read_amazon(root, "amazon-beauty")
    assert e.value.line == 2 and "meta_Beauty.json.gz" in e.value.path
    assert not marker.exists()
    write_gz(root / "meta_Beauty.json.gz", ["{'asin': 'B1', 'title': 'ok'}", "['B2', 'x']"])
    with pytest.raises(DataError, match=r"meta_Beauty\.json\.gz:2: expected a dict"):
        read_amazon(root, "amazon-beauty")


def test_amazon_bad_review_line(tmp_path: Path) -> None:
    root = tmp_path / "amazon-toys"
    root.mkdir()
    write_gz(root / "reviews_Toys_5.json.gz", [*ucsd_reviews(), '{"reviewerID": "R3", "asin": "B1"}'])
    with pytest.raises(DataError, match=r"reviews_Toys_5\.json\.gz:4: bad review record"):
        read_amazon(root, "amazon-toys")


# ---------------------------------------------------------------------------- user files
def test_csv_user_file_with_items_file(tmp_path: Path) -> None:
    inter = tmp_path / "inter.csv"
    inter.write_text("uid,iid,ts\nu1,i2,5\nu1,i1,5\nu2,i1,1\n")
    items = tmp_path / "items.csv"
    items.write_text('iid,title,genres,brand\ni1,"Soap, large",Bath|Body,Acme\ni2,Lotion,,\n')
    raw = read_raw(f"csv:{inter}", tmp_path, user_col="uid", item_col="iid", time_col="ts", items_file=items)
    assert raw.users == ["u1", "u1", "u2"] and raw.times.tolist() == [5.0, 5.0, 1.0]
    assert raw.titles == {"i1": "Soap, large", "i2": "Lotion"}
    assert raw.attributes["i1"] == {"genres": ["Bath", "Body"], "brand": "Acme"}
    assert raw.attributes["i2"] == {}
    ds = load_dataset(f"csv:{inter}", min_count=1, user_col="uid", item_col="iid", time_col="ts", items_file=items)
    assert seq_ids(ds, "u1") == ["i2", "i1"]
    assert ds.catalog.titles[ds.catalog.index_of("i1")] == "Soap, large"
    # without a time column the file order is the order
    raw = read_user_file(inter, "uid", "iid", None)
    assert raw.times is None
    with pytest.raises(DataError, match=r"inter\.csv:1: missing column"):
        read_user_file(inter, "user", "iid", "ts")
    inter.write_text("uid,iid,ts\nu1,i2,5\nu1,,5\n")
    with pytest.raises(DataError, match=r"inter\.csv:3: empty iid"):
        read_user_file(inter, "uid", "iid", "ts")
    items.write_text("iid,title\ni1,Soap,extra\n")
    inter.write_text("uid,iid,ts\nu1,i1,5\n")
    with pytest.raises(DataError, match=r"items\.csv:2"):
        read_user_file(inter, "uid", "iid", "ts", items)


def test_parquet_user_file(tmp_path: Path) -> None:
    path = tmp_path / "inter.parquet"
    pd.DataFrame({"user": [3, 3, 1], "item": [20, 10, 10], "timestamp": [2.0, 1.0, 1.0]}).to_parquet(path)
    raw = read_user_file(path, "user", "item", "timestamp")
    assert raw.users == ["3", "3", "1"] and raw.items == ["20", "10", "10"] and raw.times.tolist() == [2.0, 1.0, 1.0]
    ds = preprocess(raw, "p", min_count=1)
    assert seq_ids(ds, "3") == ["10", "20"]
    pd.DataFrame({"user": [3, None], "item": [20, 10], "timestamp": [2.0, 1.0]}).to_parquet(path)
    with pytest.raises(DataError, match="empty user"):
        read_user_file(path, "user", "item", "timestamp")
    pd.DataFrame({"user": [3, 4], "item": [20, 10], "timestamp": ["2", "soon"]}).to_parquet(path)
    with pytest.raises(DataError, match="timestamp"):
        read_user_file(path, "user", "item", "timestamp")


# ---------------------------------------------------------------------------- names and missing files
def test_unknown_dataset_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError) as e:
        load_dataset("netflix", tmp_path)
    for name in ("ml-100k", "ml-1m", "ml-latest-small", "amazon-", "csv:PATH"):
        assert name in str(e.value)


def test_missing_file_names_path_and_download_command(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError) as e:
        load_dataset("ml-100k", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "ml-100k" / "u.data") in msg
    assert f"palr data download ml-100k --data-dir {tmp_path}" in msg
    with pytest.raises(MissingDataError, match="palr data download amazon-toys"):
        load_dataset("amazon-toys", tmp_path)
    with pytest.raises(MissingDataError, match="does not exist"):
        load_dataset(f"csv:{tmp_path / 'nope.csv'}")


def test_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from palr.data import data_dir

    monkeypatch.setenv("PALR_DATA_DIR", str(tmp_path / "env"))
    assert data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("PALR_DATA_DIR")
    assert data_dir(None) == Path("~/.cache/palr/data").expanduser()


# ---------------------------------------------------------------------------- real data (PALR_DATA_DIR)
@pytest.mark.realdata
@pytest.mark.parametrize(("name", "users", "items", "interactions"), [
    ("ml-100k", 943, 1_349, 99_287),
    ("ml-latest-small", 610, 3_650, 90_274),
    ("amazon-beauty", 22_363, 12_101, 198_502),
])
def test_real_counts(data_dir_real: Path, name: str, users: int, items: int, interactions: int) -> None:
    if not (data_dir_real / name).is_dir():
        pytest.skip(f"{name} is not in {data_dir_real}")
    ds = load_dataset(name, data_dir_real)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (users, items, interactions)
    assert min(len(s) for s in ds.sequences) >= 5
    assert all(t and t != iid for t, iid in zip(ds.catalog.titles, ds.catalog.item_ids, strict=True))
    split = Split.leave_one_out(ds)
    assert sum(len(t) for t in split.train) == interactions - 2 * users


@pytest.mark.realdata
def test_real_ml100k_catalog(data_dir_real: Path) -> None:
    if not (data_dir_real / "ml-100k").is_dir():
        pytest.skip("ml-100k is not in the data directory")
    ds = load_dataset("ml-100k", data_dir_real)
    i = ds.catalog.index_of("1")
    assert ds.catalog.titles[i] == "Toy Story (1995)"
    assert ds.catalog.attributes[i]["year"] == 1995
    assert ds.catalog.tags(i) == ["Animation", "Children's", "Comedy"]
    assert ds.user_attributes is not None and ds.user_attributes[ds.user_index("1")]["occupation"] == "technician"
