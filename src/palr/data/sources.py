"""Readers for raw data files: MovieLens (100k, 1m, latest-small), Amazon 2014 (UCSD and sequence
form) and a user's own CSV/Parquet. Each returns :class:`RawData` in file order; preprocessing
(dedupe, 5-core, time sort, id maps) happens in :mod:`palr.data.preprocess`.

Every parse error raises :class:`~palr.errors.DataError` with the file and the 1-based line.
"""

from __future__ import annotations

import ast
import csv
import gzip
import html
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from palr.errors import DataError, MissingDataError

_YEAR = re.compile(r"\((\d{4})\)\s*$")


@dataclass
class RawData:
    """Interactions in file order, plus item texts/attributes keyed by original item id.

    ``times`` is None when the file is already chronological per user (Amazon sequence form).
    """

    users: list[str]
    items: list[str]
    times: list[float] | None
    titles: dict[str, str]
    attributes: dict[str, dict[str, Any]]
    kind: str
    source_files: list[str] = field(default_factory=list)
    user_attributes: dict[str, dict[str, Any]] = field(default_factory=dict)


def _require(path: Path, dataset: str) -> Path:
    if not path.exists():
        raise MissingDataError(
            f"data set {dataset!r}: expected file {path} is missing. "
            f"Run `palr data download {dataset} --data-dir {path.parent.parent}` "
            f"or place the file there (see `palr data download --help`)."
        )
    return path


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    no = 0
    try:
        with opener(path, "rt", encoding=encoding, newline="") as fh:  # type: ignore[operator]
            for no, line in enumerate(fh, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield no, line
    except UnicodeDecodeError as e:  # the decoder reads ahead, so only "after line N" is known
        raise DataError(path, None, f"not valid {encoding} text after line {no} ({e.reason})") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(path, None, f"not a complete gzip file after line {no} ({e})") from None


def _int_field(path: Path, no: int, value: str, what: str) -> str:
    value = value.strip()
    if not value:
        raise DataError(path, no, f"empty {what}")
    return value


def _float_field(path: Path, no: int, value: str, what: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise DataError(path, no, f"{what} is not a number: {value!r}") from None
    if not math.isfinite(out):  # a NaN timestamp would make the time order undefined
        raise DataError(path, no, f"{what} is not a finite number: {value!r}")
    return out


def _age_field(path: Path, no: int, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(path, no, f"age is not an integer: {value!r}") from None


def movie_attributes(title: str, genres: list[str]) -> dict[str, Any]:
    m = _YEAR.search(title)
    return {"genres": [g for g in genres if g and g != "(no genres listed)"], "year": int(m.group(1)) if m else None}


# ---------------------------------------------------------------------------- MovieLens
def read_ml100k(root: Path) -> RawData:
    data = _require(root / "u.data", "ml-100k")
    item_file = _require(root / "u.item", "ml-100k")
    users, items, times = [], [], []
    for no, line in _lines(data, "latin-1"):
        parts = line.split("\t")
        if len(parts) != 4:
            raise DataError(data, no, f"expected 4 tab-separated fields (user, item, rating, timestamp), got {len(parts)}")
        users.append(_int_field(data, no, parts[0], "user id"))
        items.append(_int_field(data, no, parts[1], "item id"))
        _float_field(data, no, parts[2], "rating")
        times.append(_float_field(data, no, parts[3], "timestamp"))
    genre_names = []
    genre_file = root / "u.genre"
    if genre_file.exists():
        for no, line in _lines(genre_file, "latin-1"):
            genre_names.append(line.partition("|")[0])
    else:  # the documented order of u.genre
        genre_names = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
    titles, attrs = {}, {}
    for no, line in _lines(item_file, "latin-1"):
        parts = line.split("|")
        if len(parts) != 5 + len(genre_names):
            raise DataError(item_file, no, f"expected {5 + len(genre_names)} '|'-separated fields, got {len(parts)}")
        iid = _int_field(item_file, no, parts[0], "movie id")
        flags = parts[5:]
        titles[iid] = parts[1].strip()
        attrs[iid] = movie_attributes(titles[iid], [g for g, f in zip(genre_names, flags) if f.strip() == "1"])
    user_attrs: dict[str, dict[str, Any]] = {}
    user_file = root / "u.user"
    if user_file.exists():
        for no, line in _lines(user_file, "latin-1"):
            parts = line.split("|")
            if len(parts) != 5:
                raise DataError(user_file, no, f"expected 5 '|'-separated fields, got {len(parts)}")
            user_attrs[parts[0]] = {"age": _age_field(user_file, no, parts[1]), "gender": parts[2],
                                     "occupation": parts[3]}
    return RawData(users, items, times, titles, attrs, "movies", [str(data), str(item_file)], user_attrs)


def read_ml1m(root: Path) -> RawData:
    ratings = _require(root / "ratings.dat", "ml-1m")
    movies = _require(root / "movies.dat", "ml-1m")
    users, items, times = [], [], []
    for no, line in _lines(ratings, "latin-1"):
        parts = line.split("::")
        if len(parts) != 4:
            raise DataError(ratings, no, f"expected 'UserID::MovieID::Rating::Timestamp', got {len(parts)} fields")
        users.append(_int_field(ratings, no, parts[0], "user id"))
        items.append(_int_field(ratings, no, parts[1], "movie id"))
        _float_field(ratings, no, parts[2], "rating")
        times.append(_float_field(ratings, no, parts[3], "timestamp"))
    titles, attrs = {}, {}
    for no, line in _lines(movies, "latin-1"):
        parts = line.split("::")
        if len(parts) != 3:
            raise DataError(movies, no, f"expected 'MovieID::Title::Genres', got {len(parts)} fields")
        titles[parts[0]] = parts[1].strip()
        attrs[parts[0]] = movie_attributes(parts[1], parts[2].split("|"))
    user_attrs = {}
    users_file = root / "users.dat"
    if users_file.exists():
        for no, line in _lines(users_file, "latin-1"):
            parts = line.split("::")
            if len(parts) != 5:
                raise DataError(users_file, no, f"expected 5 '::'-separated fields, got {len(parts)}")
            user_attrs[parts[0]] = {"gender": parts[1], "age": _age_field(users_file, no, parts[2]),
                                     "occupation": parts[3]}
    return RawData(users, items, times, titles, attrs, "movies", [str(ratings), str(movies)], user_attrs)


def _csv_rows(path: Path, required: list[str], encoding: str = "utf-8-sig") -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV file with their 1-based line number (of the row's last line); utf-8-sig drops a BOM."""
    reader = None
    try:
        with open(path, encoding=encoding, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(path, 1, f"missing column(s) {missing}; header is {reader.fieldnames}")
            for row in reader:
                no = reader.line_num
                if None in row or any(row.get(c) is None for c in required):
                    raise DataError(path, no, f"wrong number of fields (header has {len(reader.fieldnames or [])})")
                yield no, row
    except UnicodeDecodeError as e:
        after = reader.line_num if reader is not None else 0
        raise DataError(path, None, f"not valid {encoding} text after line {after} ({e.reason})") from None
    except csv.Error as e:
        raise DataError(path, reader.line_num if reader is not None else None, f"bad CSV: {e}") from None


def read_ml_latest(root: Path, name: str = "ml-latest-small") -> RawData:
    ratings = _require(root / "ratings.csv", name)
    movies = _require(root / "movies.csv", name)
    users, items, times = [], [], []
    for no, row in _csv_rows(ratings, ["userId", "movieId", "rating", "timestamp"]):
        users.append(_int_field(ratings, no, row["userId"], "userId"))
        items.append(_int_field(ratings, no, row["movieId"], "movieId"))
        _float_field(ratings, no, row["rating"], "rating")
        times.append(_float_field(ratings, no, row["timestamp"], "timestamp"))
    titles, attrs = {}, {}
    for no, row in _csv_rows(movies, ["movieId", "title", "genres"]):
        titles[row["movieId"]] = row["title"].strip()
        attrs[row["movieId"]] = movie_attributes(row["title"], row["genres"].split("|"))
    return RawData(users, items, times, titles, attrs, "movies", [str(ratings), str(movies)])


# ---------------------------------------------------------------------------- Amazon 2014
def _flatten_categories(paths: Any, path: Path, no: int) -> list[str]:
    if not isinstance(paths, list):
        raise DataError(path, no, "categories must be a list of category paths")
    out: list[str] = []
    for p in paths:
        for c in (p if isinstance(p, list) else [p])[1:] or (p if isinstance(p, list) else [p]):
            c = html.unescape(str(c))
            if c not in out:
                out.append(c)
    return out


def read_amazon_sequences(root: Path, name: str) -> RawData:
    """The P5/OpenP5 sequence form: user_sequence.txt (+ item_titles.tsv, item_categories.tsv)."""
    seq = _require(root / "user_sequence.txt", name)
    users, items = [], []
    for no, line in _lines(seq, "utf-8"):
        parts = line.split()
        if len(parts) < 2:
            raise DataError(seq, no, "expected 'user_id item_1 item_2 ...' with at least one item")
        users.extend([parts[0]] * (len(parts) - 1))
        items.extend(parts[1:])
    titles: dict[str, str] = {}
    attrs: dict[str, dict[str, Any]] = {}
    tfile, cfile = root / "item_titles.tsv", root / "item_categories.tsv"
    if tfile.exists():
        for no, line in _lines(tfile, "utf-8"):
            if no == 1 and line.startswith("asin"):
                continue
            asin, tab, title = line.partition("\t")
            if not tab:
                raise DataError(tfile, no, "expected 'asin<TAB>title'")
            titles[asin] = html.unescape(title).strip()
    if cfile.exists():
        for no, line in _lines(cfile, "utf-8"):
            if no == 1 and line.startswith("asin"):
                continue
            asin, tab, value = line.partition("\t")
            if not tab:
                raise DataError(cfile, no, "expected 'asin<TAB>categories_json'")
            try:
                cats = json.loads(value)
            except json.JSONDecodeError as e:
                raise DataError(cfile, no, f"categories are not valid JSON: {e.msg}") from None
            attrs[asin] = {"categories": _flatten_categories(cats, cfile, no)}
    return RawData(users, items, None, titles, attrs, "products", [str(seq)])


def read_amazon_ucsd(root: Path, name: str, category: str) -> RawData:
    """The original UCSD 2014 files: reviews_<Category>_5.json.gz and meta_<Category>.json.gz."""
    reviews = _require(root / f"reviews_{category}_5.json.gz", name)
    users, items, times = [], [], []
    for no, line in _lines(reviews, "utf-8"):
        try:
            rec = json.loads(line)
            users.append(str(rec["reviewerID"]))
            items.append(str(rec["asin"]))
            times.append(float(rec["unixReviewTime"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(reviews, no, f"bad review record ({type(e).__name__}: {e})") from None
    titles, attrs = {}, {}
    meta = root / f"meta_{category}.json.gz"
    if meta.exists():
        wanted = set(items)
        for no, line in _lines(meta, "utf-8"):
            try:  # the metadata is Python-literal text: literal_eval, never eval
                rec = ast.literal_eval(line)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
                raise DataError(meta, no, f"not a Python literal ({type(e).__name__})") from None
            if not isinstance(rec, dict) or "asin" not in rec:
                raise DataError(meta, no, "expected a dict with an 'asin' key")
            asin = str(rec["asin"])
            if asin not in wanted:
                continue
            titles[asin] = html.unescape(str(rec.get("title", ""))).strip()
            attrs[asin] = {"categories": _flatten_categories(rec.get("categories", []), meta, no)}
    return RawData(users, items, times, titles, attrs, "products", [str(reviews)])


def read_amazon(root: Path, name: str) -> RawData:
    if (root / "user_sequence.txt").exists():
        return read_amazon_sequences(root, name)
    found = sorted(root.glob("reviews_*_5.json.gz")) if root.exists() else []
    if found:
        category = found[0].name[len("reviews_"):-len("_5.json.gz")]
        return read_amazon_ucsd(root, name, category)
    raise MissingDataError(
        f"data set {name!r}: {root} holds neither user_sequence.txt (sequence form) nor "
        f"reviews_<Category>_5.json.gz (UCSD form). Run `palr data download {name}` or place the files there."
    )


# ---------------------------------------------------------------------------- user files
def read_user_file(path: Path, user_col: str, item_col: str, time_col: str | None,
                   items_file: Path | None = None) -> RawData:
    """A user's own interactions (CSV or Parquet) and an optional item file (id, title, attributes)."""
    if not path.exists():
        raise MissingDataError(f"interactions file {path} does not exist")
    users: list[str] = []
    items: list[str] = []
    times: list[float] | None = [] if time_col else None
    if path.suffix in (".parquet", ".pq"):
        import numpy as np
        import pandas as pd

        try:
            df = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several unrelated types for a bad file
            raise DataError(path, None, f"cannot read Parquet ({type(e).__name__}: {e})") from None
        cols = [c for c in (user_col, item_col, time_col) if c]
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise DataError(path, None, f"missing column(s) {missing}; columns are {list(df.columns)}")
        for c in cols:
            bad = df[c].isna().to_numpy().nonzero()[0]
            if len(bad):
                raise DataError(path, int(bad[0]) + 1, f"row {int(bad[0]) + 1}: empty {c}")
        users = df[user_col].astype(str).tolist()
        items = df[item_col].astype(str).tolist()
        if time_col:
            as_float = pd.to_numeric(df[time_col], errors="coerce").astype(float)
            bad = (~np.isfinite(as_float.to_numpy())).nonzero()[0]
            if len(bad):
                r = int(bad[0])
                raise DataError(path, r + 1, f"row {r + 1}: {time_col} is not a finite number: "
                                             f"{df[time_col].iloc[r]!r}")
            times = as_float.tolist()
    else:
        required = [c for c in (user_col, item_col, time_col) if c]
        for no, row in _csv_rows(path, required):
            users.append(_int_field(path, no, row[user_col], user_col))
            items.append(_int_field(path, no, row[item_col], item_col))
            if times is not None:
                times.append(_float_field(path, no, row[time_col], time_col))  # type: ignore[index]
    titles: dict[str, str] = {}
    attrs: dict[str, dict[str, Any]] = {}
    if items_file is not None:
        if not items_file.exists():
            raise MissingDataError(f"item file {items_file} does not exist")
        with open(items_file, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            if not fields:
                raise DataError(items_file, 1, "empty item file")
            id_col = item_col if item_col in fields else fields[0]
            for row in reader:
                if None in row or None in row.values():
                    raise DataError(items_file, reader.line_num,
                                    f"wrong number of fields (header has {len(fields)})")
                iid = (row.get(id_col) or "").strip()
                if not iid:
                    raise DataError(items_file, reader.line_num, f"empty item id in column {id_col!r}")
                titles[iid] = (row.get("title") or iid).strip()
                extra = {k: v for k, v in row.items() if k not in (id_col, "title") and v}
                tags = [t.strip() for t in (extra.pop("genres", "") or extra.pop("categories", "")).split("|") if t.strip()]
                attrs[iid] = {"genres": tags, **extra} if tags else extra
    return RawData(users, items, times, titles, attrs, "items", [str(path)])
