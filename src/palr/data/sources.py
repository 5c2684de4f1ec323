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
from datetime import UTC, datetime
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


_BOMS = ("\ufeff", "\u00ef\u00bb\u00bf")  # a UTF-8 byte order mark, read as UTF-8 or as latin-1


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """Non-empty lines with their 1-based numbers; a leading byte order mark is dropped."""
    opener = gzip.open if path.suffix == ".gz" else open
    no = 0
    try:
        with opener(path, "rt", encoding=encoding, newline="") as fh:  # type: ignore[operator]
            for no, line in enumerate(fh, start=1):
                line = line.rstrip("\r\n")
                if no == 1:
                    for bom in _BOMS:
                        line = line.removeprefix(bom)
                if line.strip():
                    yield no, line
    except UnicodeDecodeError as e:  # the decoder reads ahead, so only "after line N" is known
        raise DataError(path, None, f"not valid {encoding} text after line {no} ({e.reason})") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(path, None, f"not a complete gzip file after line {no} ({e})") from None


_INTEGRAL = re.compile(r"^[+-]?\d+\.0*$")  # "12.0": an integer written as a float (pandas, spreadsheets)


def _int_field(path: Path, no: int, value: str, what: str) -> str:
    """An integer id field (MovieLens) in canonical form: '0242' and '242.0' are item '242'."""
    value = value.strip()
    if not value:
        raise DataError(path, no, f"empty {what}")
    if _INTEGRAL.match(value):
        value = value.split(".")[0]
    try:
        return str(int(value))
    except ValueError:
        raise DataError(path, no, f"{what} is not an integer: {value!r}") from None


def _id_field(path: Path, no: int, value: str, what: str) -> str:
    """A free-form id (a user's own files): stripped; an integral float ('12.0') is the integer ('12')."""
    value = value.strip()
    if not value:
        raise DataError(path, no, f"empty {what}")
    return value.split(".")[0] if _INTEGRAL.match(value) else value


def parse_time(value: str) -> float | None:
    """Epoch seconds, or an ISO-8601 date/time (no zone = UTC) as epoch seconds; None if neither."""
    value = value.strip()
    try:
        out = float(value)
    except ValueError:
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
        except ValueError:
            return None
        out = (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()
    return out if math.isfinite(out) else None


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
            user_attrs[_int_field(user_file, no, parts[0], "user id")] = {
                "age": _age_field(user_file, no, parts[1]), "gender": parts[2], "occupation": parts[3]}
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
        mid = _int_field(movies, no, parts[0], "movie id")
        titles[mid] = parts[1].strip()
        attrs[mid] = movie_attributes(parts[1], parts[2].split("|"))
    user_attrs = {}
    users_file = root / "users.dat"
    if users_file.exists():
        for no, line in _lines(users_file, "latin-1"):
            parts = line.split("::")
            if len(parts) != 5:
                raise DataError(users_file, no, f"expected 5 '::'-separated fields, got {len(parts)}")
            user_attrs[_int_field(users_file, no, parts[0], "user id")] = {
                "gender": parts[1], "age": _age_field(users_file, no, parts[2]), "occupation": parts[3]}
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
        mid = _int_field(movies, no, row["movieId"], "movieId")
        titles[mid] = row["title"].strip()
        attrs[mid] = movie_attributes(row["title"], row["genres"].split("|"))
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
def _frame_ids(df: Any, col: str, path: Path) -> list[str]:
    """An id column of a DataFrame as text; floats that are whole numbers are integers ('1', not '1.0')."""
    import numpy as np

    s = df[col]
    bad = s.isna().to_numpy().nonzero()[0]
    if len(bad):
        raise DataError(path, int(bad[0]) + 1, f"row {int(bad[0]) + 1}: empty {col}")
    if s.dtype.kind == "f":
        v = s.to_numpy()
        frac = (v != np.floor(v)).nonzero()[0]
        if len(frac):
            r = int(frac[0])
            raise DataError(path, r + 1, f"row {r + 1}: {col} is not a whole number: {v[r]!r}")
        return [str(int(x)) for x in v]
    return [_id_field(path, r + 1, str(x), col) for r, x in enumerate(s.tolist())]


def _frame_times(df: Any, col: str, path: Path) -> list[float]:
    """Epoch seconds from numbers, datetimes or ISO-8601 text (naive times are UTC)."""
    import numpy as np
    import pandas as pd

    s = df[col]
    if s.dtype.kind == "M":
        t = pd.to_datetime(s, utc=True)
        out = (t - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    else:
        out = pd.to_numeric(s, errors="coerce").astype(float).to_numpy()
        if s.dtype.kind == "O" and np.isnan(out).any():
            out = np.asarray([parse_time(str(x)) if x is not None else None for x in s], dtype=float)
    bad = (~np.isfinite(out)).nonzero()[0]
    if len(bad):
        r = int(bad[0])
        raise DataError(path, r + 1, f"row {r + 1}: {col} is not a finite number or ISO-8601 time: {s.iloc[r]!r}")
    return out.tolist()


def _read_frame(path: Path, columns: list[str]) -> Any:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several unrelated types for a bad file
        raise DataError(path, None, f"cannot read Parquet ({type(e).__name__}: {e})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(path, None, f"missing column(s) {missing}; columns are {list(df.columns)}")
    return df


def _is_parquet(path: Path) -> bool:
    return path.suffix in (".parquet", ".pq")


def read_user_file(path: Path, user_col: str, item_col: str, time_col: str | None,
                   items_file: Path | None = None, *, title_col: str = "title", tags_col: str = "") -> RawData:
    """A user's own interactions (CSV or Parquet) and an optional item file (CSV or Parquet: id, title,
    tags, attribute columns). Times are epoch seconds or ISO-8601; ids are text, whole floats as integers."""
    if not path.exists():
        raise MissingDataError(f"interactions file {path} does not exist")
    users: list[str] = []
    items: list[str] = []
    times: list[float] | None = [] if time_col else None
    if _is_parquet(path):
        df = _read_frame(path, [c for c in (user_col, item_col, time_col) if c])
        users, items = _frame_ids(df, user_col, path), _frame_ids(df, item_col, path)
        if time_col:
            times = _frame_times(df, time_col, path)
    else:
        required = [c for c in (user_col, item_col, time_col) if c]
        for no, row in _csv_rows(path, required):
            users.append(_id_field(path, no, row[user_col], user_col))
            items.append(_id_field(path, no, row[item_col], item_col))
            if times is not None:
                t = parse_time(row[time_col])  # type: ignore[index]
                if t is None:
                    raise DataError(path, no, f"{time_col} is not a number (epoch seconds) or an ISO-8601 time: "
                                              f"{row[time_col]!r}")  # type: ignore[index]
                times.append(t)
    titles: dict[str, str] = {}
    attrs: dict[str, dict[str, Any]] = {}
    if items_file is not None:
        titles, attrs = read_items_file(items_file, item_col, title_col, tags_col)
        check_items_match(items_file, set(titles), set(items))
    return RawData(users, items, times, titles, attrs, "items", [str(path)] + ([str(items_file)] if items_file else []))


def _item_rows(items_file: Path, item_col: str) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    """The id column and the rows (line number, column -> value) of an items file, CSV or Parquet."""
    if _is_parquet(items_file):
        df = _read_frame(items_file, [])
        cols = [str(c) for c in df.columns]
        if not cols:
            raise DataError(items_file, None, "no columns")
        id_col = item_col if item_col in cols else cols[0]
        ids = _frame_ids(df, id_col, items_file)
        recs = df.to_dict("records")
        return id_col, ((r + 1, {**{str(k): v for k, v in rec.items()}, id_col: ids[r]}) for r, rec in enumerate(recs))
    with open(items_file, encoding="utf-8-sig", newline="") as fh:
        fields = next(csv.reader(fh), [])
    if not fields:
        raise DataError(items_file, 1, "empty item file")
    id_col = item_col if item_col in fields else fields[0]
    return id_col, _csv_rows(items_file, [id_col])


def _present(v: Any) -> bool:
    """Not None, not NaN (an empty Parquet cell), not blank text."""
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v).strip() != ""


def _plain(v: Any) -> Any:
    """numpy scalars and arrays (from Parquet) as plain Python values; text stripped."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    return v.strip() if isinstance(v, str) else v


def read_items_file(items_file: Path, item_col: str, title_col: str = "title",
                    tags_col: str = "") -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Titles and attributes by item id. The id column is ``item_col`` when present, else the first;
    tags come from ``tags_col`` (else ``genres`` or ``categories``) as 'a|b'; other columns are attributes."""
    if not items_file.exists():
        raise MissingDataError(f"item file {items_file} does not exist")
    id_col, rows = _item_rows(items_file, item_col)
    titles: dict[str, str] = {}
    attrs: dict[str, dict[str, Any]] = {}
    for no, row in rows:
        iid = _id_field(items_file, no, str(row.get(id_col) or ""), f"item id in column {id_col!r}")
        clean = {k: _plain(v) for k, v in row.items() if _present(v)}
        titles[iid] = str(clean.get(title_col, iid)).strip()
        extra = {k: v for k, v in clean.items() if k not in (id_col, title_col)}
        tag_text = extra.pop(tags_col, "") if tags_col else (extra.pop("genres", "") or extra.pop("categories", ""))
        tags = [t.strip() for t in (tag_text if isinstance(tag_text, list) else str(tag_text).split("|")) if str(t).strip()]
        attrs[iid] = {"genres": tags, **extra} if tags else extra
    return titles, attrs


def check_items_match(items_file: Path, item_ids: set[str], interaction_ids: set[str]) -> None:
    """An items file must describe the interactions' items: none matching is an error, a part is a warning."""
    import logging

    matched = len(interaction_ids & item_ids)
    if interaction_ids and matched == 0:
        raise DataError(items_file, None, f"none of its {len(item_ids)} item ids matches an item of the interactions "
                                          f"(items file: {sorted(item_ids)[:3]}; interactions: "
                                          f"{sorted(interaction_ids)[:3]}); check --item-col and the id column")
    if matched < len(interaction_ids):
        logging.getLogger(__name__).warning(
            "%s describes %d of the %d interaction items (%.1f%%); the others show their ids as titles",
            items_file, matched, len(interaction_ids), 100.0 * matched / len(interaction_ids))
