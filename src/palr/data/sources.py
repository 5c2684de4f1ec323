"""Readers for raw data files: MovieLens (100k, 1m, latest-small), Amazon 2014 (UCSD and sequence
form) and a user's own CSV/Parquet. Each returns :class:`RawData` in file order; preprocessing
(dedupe, 5-core, time sort, id maps) happens in :mod:`palr.data.preprocess`.

Every parse error raises :class:`~palr.core.errors.DataError` with the file and the 1-based line.
"""

from __future__ import annotations

import ast
import csv
import gzip
import html
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from palr.core.errors import DataError, MissingDataError
from palr.data.columns import (
    Ids,
    decode_check,
    first_error,
    float_check,
    id_check,
    ids_from_arrow,
    nth_field,
    read_bytes,
    read_csv_columns,
    read_lines,
    split_fields,
)

_YEAR = re.compile(r"\((\d{4})\)\s*$")


@dataclass
class RawData:
    """Interactions in file order, plus item texts/attributes keyed by original item id.

    ``users`` and ``items`` are :class:`~palr.data.columns.Ids` (integer codes + distinct ids; a list of
    strings is converted); ``times`` is a float64 array, or None when the file is already chronological per
    user (Amazon sequence form).
    """

    users: Ids
    items: Ids
    times: np.ndarray | None
    titles: dict[str, str]
    attributes: dict[str, dict[str, Any]]
    kind: str
    source_files: list[str] = field(default_factory=list)
    user_attributes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.users, self.items = Ids.of(self.users), Ids.of(self.items)
        if self.times is not None:
            self.times = np.asarray(self.times, dtype=np.float64)
        if not len(self.users) == len(self.items) == (len(self.users) if self.times is None else len(self.times)):
            raise ValueError("users, items and times must have one value per interaction")


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


def int_id(value: str) -> str:
    """An integer id (MovieLens) in canonical form: '0242' and '242.0' are item '242'. ValueError (its
    message says '{what}' for the field's name) if it is empty or not an integer."""
    value = value.strip()
    if not value:
        raise ValueError("empty {what}")
    if _INTEGRAL.match(value):
        value = value.split(".")[0]
    try:
        return str(int(value))
    except ValueError:
        raise ValueError("{what} is not an integer: " + repr(value)) from None


def free_id(value: str) -> str:
    """A free-form id (a user's own files): stripped; an integral float ('12.0') is the integer ('12')."""
    value = value.strip()
    if not value:
        raise ValueError("empty {what}")
    return value.split(".")[0] if _INTEGRAL.match(value) else value


def _int_field(path: Path, no: int, value: str, what: str) -> str:
    try:
        return int_id(value)
    except ValueError as e:
        raise DataError(path, no, str(e).replace("{what}", what)) from None


def _id_field(path: Path, no: int, value: str, what: str) -> str:
    try:
        return free_id(value)
    except ValueError as e:
        raise DataError(path, no, str(e).replace("{what}", what)) from None


def _age_field(path: Path, no: int, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(path, no, f"age is not an integer: {value!r}") from None


def movie_attributes(title: str, genres: list[str]) -> dict[str, Any]:
    m = _YEAR.search(title)
    return {"genres": [g for g in genres if g and g != "(no genres listed)"], "year": int(m.group(1)) if m else None}


# ---------------------------------------------------------------------------- MovieLens
def _rating_rows(path: Path, encoding: str, sep: str, shape: str) -> tuple[Ids, Ids, np.ndarray]:
    """(users, items, times) of a 'user SEP item SEP rating SEP timestamp' file (MovieLens), vectorised: the
    first bad line, in file order, raises with its number as a line-by-line reader would."""
    lines, numbers = read_lines(path, encoding)
    fields, counts = split_fields(lines, sep)
    wrong = np.flatnonzero(counts != 4)
    limit = int(wrong[0]) if len(wrong) else len(counts)
    ok = fields.slice(0, limit)
    users, cu = id_check(nth_field(ok, 0), int_id, "user id")
    items, ci = id_check(nth_field(ok, 1), int_id, "item id" if sep == "\t" else "movie id")
    _, cr = float_check(nth_field(ok, 2), "rating")
    times, ct = float_check(nth_field(ok, 3), "timestamp")
    err = first_error(path, lambda r: int(numbers[r]), [cu, ci, cr, ct])
    if err is not None:
        raise err
    if limit < len(counts):
        raise DataError(path, int(numbers[limit]), f"expected {shape}, got {int(counts[limit])}" +
                        ("" if sep == "\t" else " fields"))
    return users, items, times


def read_ml100k(root: Path) -> RawData:
    data = _require(root / "u.data", "ml-100k")
    item_file = _require(root / "u.item", "ml-100k")
    users, items, times = _rating_rows(data, "latin-1", "\t", "4 tab-separated fields (user, item, rating, timestamp)")
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
    users, items, times = _rating_rows(ratings, "latin-1", "::", "'UserID::MovieID::Rating::Timestamp'")
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
    """Rows of a CSV file with the 1-based line number where each row starts; utf-8-sig drops a BOM.

    A row with too few or too many fields, an unterminated quote (which would swallow the rest of the file into
    one field) or a field over the size limit stops with the line where that row starts."""
    reader = None
    start = 1  # the line the row being read starts on
    try:
        with open(path, encoding=encoding, newline="") as fh:
            reader = csv.reader(fh, strict=True)
            header = next(reader, None) or []
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(path, 1, f"missing column(s) {missing}; header is {header}")
            start = reader.line_num + 1
            for fields in reader:
                no, start = start, reader.line_num + 1
                if not fields:  # a blank line
                    continue
                if len(fields) != len(header):
                    raise DataError(path, no, f"wrong number of fields: {len(fields)} (header has {len(header)})"
                                    + (" - an unterminated quote?" if any("\n" in f for f in fields) else ""))
                yield no, dict(zip(header, fields))
    except UnicodeDecodeError as e:
        after = reader.line_num if reader is not None else 0
        raise DataError(path, None, f"not valid {encoding} text after line {after} ({e.reason})") from None
    except csv.Error as e:
        why = ("unterminated quote: the field runs to the end of the file" if "unexpected end of data" in str(e)
               else f"bad CSV: {e}")
        raise DataError(path, start, why) from None


def read_ml_latest(root: Path, name: str = "ml-latest-small") -> RawData:
    ratings = _require(root / "ratings.csv", name)
    movies = _require(root / "movies.csv", name)
    table = read_csv_columns(ratings, ["userId", "movieId", "rating", "timestamp"])
    users, cu = id_check(table.columns["userId"], int_id, "userId")
    items, ci = id_check(table.columns["movieId"], int_id, "movieId")
    _, cr = float_check(table.columns["rating"], "rating")
    times, ct = float_check(table.columns["timestamp"], "timestamp")
    table.raise_first([cu, ci, cr, ct])
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


def _sequence_rows(seq: Path) -> tuple[Ids, Ids]:
    """(users, items) of 'user_id item_1 item_2 ...' lines, one interaction per item (vectorised)."""
    import pyarrow.compute as pc

    lines, numbers = read_lines(seq, "utf-8")
    fields = pc.utf8_split_whitespace(lines)
    counts = pc.list_value_length(fields).to_numpy(zero_copy_only=False)
    short = np.flatnonzero(counts < 2)
    if len(short):
        raise DataError(seq, int(numbers[short[0]]), "expected 'user_id item_1 item_2 ...' with at least one item")
    rest = pc.list_slice(fields, 1)
    owners = ids_from_arrow(nth_field(fields, 0))
    owner_row = pc.list_parent_indices(rest).to_numpy(zero_copy_only=False)
    return Ids(owners.codes[owner_row], owners.vocab), ids_from_arrow(pc.list_flatten(rest))


def read_amazon_sequences(root: Path, name: str) -> RawData:
    """The P5/OpenP5 sequence form: user_sequence.txt (+ item_titles.tsv, item_categories.tsv)."""
    seq = _require(root / "user_sequence.txt", name)
    users, items = _sequence_rows(seq)
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


def _review_rows(reviews: Path) -> tuple[Ids, Ids, np.ndarray]:
    """(users, items, times) of UCSD review JSON lines: parsed in C (pyarrow); a file it cannot take as is
    (a bad line, a missing key, ids written as numbers) is read line by line, which names the bad line."""
    import pyarrow as pa
    import pyarrow.json as pj

    schema = pa.schema([("reviewerID", pa.string()), ("asin", pa.string()), ("unixReviewTime", pa.float64())])
    try:
        table = pj.read_json(pa.BufferReader(decode_check(reviews, read_bytes(reviews), "utf-8")),
                             parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
        if table.num_rows and not any(table.column(c).null_count for c in schema.names):
            times = table.column("unixReviewTime").to_numpy()
            if np.isfinite(times).all():
                return ids_from_arrow(table.column("reviewerID")), ids_from_arrow(table.column("asin")), times
    except pa.ArrowInvalid:
        pass
    users, items, out = [], [], []
    for no, line in _lines(reviews, "utf-8"):
        try:
            rec = json.loads(line)
            users.append(str(rec["reviewerID"]))
            items.append(str(rec["asin"]))
            out.append(float(rec["unixReviewTime"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(reviews, no, f"bad review record ({type(e).__name__}: {e})") from None
    return Ids.of(users), Ids.of(items), np.asarray(out, dtype=np.float64)


def read_amazon_ucsd(root: Path, name: str, category: str) -> RawData:
    """The original UCSD 2014 files: reviews_<Category>_5.json.gz and meta_<Category>.json.gz."""
    reviews = _require(root / f"reviews_{category}_5.json.gz", name)
    users, items, times = _review_rows(reviews)
    titles, attrs = {}, {}
    meta = root / f"meta_{category}.json.gz"
    if meta.exists():
        wanted = items.used()
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
