"""Columnar reading for the data readers: whole columns parsed in C (pyarrow), ids as integer codes.

No Python loop runs per row. Validation is vectorised too: a bad value or a malformed row is found as a row
index, and only then is the file scanned (once, in Python) for that row's 1-based line, so every error still
says ``file:line``. Ids are kept as :class:`Ids` (an int32 code a row plus the distinct id strings): 10M
interactions take 80 MB instead of 20M Python strings.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from palr.core.errors import DataError

LineOf = Callable[[int], int | None]  # 0-based row index -> 1-based line in the file
Check = tuple[np.ndarray, Callable[[int], str]]  # ((R,) bool: bad rows, row -> error message)


class Ids:
    """A column of ids as ``codes`` (int, one a row) into ``vocab`` (the distinct id strings).

    Behaves as a read-only sequence of str (iteration, indexing, ``==`` with a list) for small uses and tests;
    the preprocessing works on the codes.
    """

    __slots__ = ("codes", "vocab")

    def __init__(self, codes: np.ndarray, vocab: Sequence[str]) -> None:
        self.codes = np.asarray(codes)
        self.vocab = list(vocab)

    @classmethod
    def of(cls, values: Ids | Sequence[str]) -> Ids:
        """Codes of a sequence of strings in order of first appearance (an :class:`Ids` is returned as is)."""
        if isinstance(values, Ids):
            return values
        import pandas as pd

        codes, uniques = pd.factorize(np.asarray([str(v) for v in values], dtype=object), sort=False)
        return cls(codes.astype(np.int64), [str(u) for u in uniques])

    def __len__(self) -> int:
        return len(self.codes)

    def __iter__(self) -> Iterator[str]:
        vocab = self.vocab
        return (vocab[c] for c in self.codes.tolist())

    def __getitem__(self, i: int) -> str:
        return self.vocab[int(self.codes[i])]

    def tolist(self) -> list[str]:
        return list(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Ids):
            return self.tolist() == other.tolist()
        if isinstance(other, (list, tuple)):
            return self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Ids({len(self)} rows, {len(self.vocab)} distinct)"

    def used(self) -> set[str]:
        """The distinct ids that occur."""
        return {self.vocab[c] for c in np.unique(self.codes).tolist()}

    def canonical(self, canon: Callable[[str], str]) -> tuple[Ids, np.ndarray]:
        """Apply ``canon`` to each distinct id (not each row) and merge ids that become equal ('1.0' -> '1').

        ``canon`` raises ValueError for a bad id. Returns (the canonical ids, (R,) bool: rows holding a bad
        id); bad ids keep their text.
        """
        out: list[str] = []
        bad = np.zeros(len(self.vocab), dtype=bool)
        for j, v in enumerate(self.vocab):
            try:
                out.append(canon(v))
            except ValueError:
                bad[j] = True
                out.append(v)
        rows_bad = bad[self.codes] if bad.any() else np.zeros(len(self.codes), dtype=bool)
        if out == self.vocab:
            return self, rows_bad
        import pandas as pd

        remap, uniques = pd.factorize(np.asarray(out, dtype=object), sort=False)
        return Ids(remap[self.codes], [str(u) for u in uniques]), rows_bad


def ids_from_arrow(column: Any) -> Ids:
    """Codes and distinct values of a pyarrow string column (C speed; the chunks of a chunked column share
    one dictionary, so nothing is copied into one array first)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    enc = pc.dictionary_encode(column)
    if enc.num_chunks == 0:
        return Ids(np.zeros(0, dtype=np.int32), [])
    codes = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in enc.chunks]).astype(np.int32, copy=False)
    return Ids(codes, enc.chunk(enc.num_chunks - 1).dictionary.to_pylist())


# ---------------------------------------------------------------------------- lines of a text file
def read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        except (gzip.BadGzipFile, EOFError, OSError) as e:
            raise DataError(path, None, f"not a complete gzip file ({e})") from None
    return path.read_bytes()


def decode_check(path: Path, data: bytes, encoding: str) -> bytes:
    """UTF-8 bytes of the file (latin-1 is transcoded); invalid UTF-8 names the line where it starts."""
    if encoding.lower().replace("_", "-") in ("latin-1", "latin1", "iso-8859-1"):
        return data.decode("latin-1").encode("utf-8")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(path, None, f"not valid utf-8 text at line {line} ({e.reason})") from None
    return data


def read_lines(path: Path, encoding: str = "utf-8") -> tuple[Any, np.ndarray]:
    """(pyarrow string array of the non-blank lines, their 1-based line numbers); '\\r\\n' and a leading byte
    order mark dropped, whitespace-only lines skipped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    data = decode_check(path, read_bytes(path), encoding)
    for bom in (b"\xef\xbb\xbf", "\u00ef\u00bb\u00bf".encode()):  # a UTF-8 BOM, read as UTF-8 or as latin-1
        data = data.removeprefix(bom)
    if not data.endswith(b"\n"):
        data += b"\n"
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)  # (L,) positions of '\n'
    starts = np.concatenate([[0], ends[:-1] + 1])
    offsets = np.empty(len(ends) + 1, dtype=np.int64)
    offsets[:-1], offsets[-1] = starts, len(data)
    lines = pa.LargeStringArray.from_buffers(len(ends), pa.py_buffer(offsets), pa.py_buffer(data))
    lines = pc.utf8_rtrim(lines, characters="\r\n")
    keep = pc.invert(pc.equal(pc.utf8_trim_whitespace(lines), "")).to_numpy(zero_copy_only=False)
    numbers = np.flatnonzero(keep) + 1
    return lines.filter(pa.array(keep)), numbers


def split_fields(lines: Any, sep: str) -> tuple[Any, np.ndarray]:
    """(list<string> of the fields of each line, (L,) field counts), ``str.split(sep)`` semantics."""
    import pyarrow.compute as pc

    fields = pc.split_pattern(lines, pattern=sep)
    return fields, pc.list_value_length(fields).to_numpy(zero_copy_only=False)


def nth_field(fields: Any, j: int) -> Any:
    """The j-th field of every line (lines must all have more than j fields)."""
    import pyarrow.compute as pc

    return pc.list_element(fields, j)


# ---------------------------------------------------------------------------- CSV files
@dataclass
class CsvColumns:
    """Columns of a CSV file as pyarrow strings, with what is needed to report a bad row by its line.

    ``pending``: the first malformed row (wrong number of fields), raised by :meth:`raise_first` unless a bad
    value comes before it; ``limit``: the rows read before that malformed one.
    """

    path: Path
    columns: dict[str, Any]
    data: bytes
    pending: DataError | None = None
    limit: int | None = None

    def line_of(self, r: int) -> int | None:
        for k, (line, _) in enumerate(_csv_rows(self.data)):
            if k == r:
                return line
        return None

    def raise_first(self, checks: Sequence[Check]) -> None:
        """Raise the first error in file order: a bad value (``checks``) or the malformed row."""
        err = first_error(self.path, self.line_of, checks, self.limit)
        if err is not None:
            raise err
        if self.pending is not None:
            raise self.pending


def read_csv_columns(path: Path, required: Sequence[str]) -> CsvColumns:
    """The ``required`` columns of a CSV file (header row, UTF-8, a BOM dropped) as pyarrow string columns.

    A missing column raises at once (line 1); a row with the wrong number of fields is kept as ``pending``
    (the same message and line as Python's ``csv`` reader gives)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    data = decode_check(path, read_bytes(path), "utf-8")
    with io.StringIO(data[:1 << 20].decode("utf-8", errors="replace").removeprefix("\ufeff"), newline="") as fh:
        header = next(csv.reader(fh), [])
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(path, 1, f"missing column(s) {list(missing)}; header is {header}")
    invalid: list[str] = []

    def on_invalid(row: Any) -> str:
        invalid.append(row.text)
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                 include_columns=list(required), strings_can_be_null=False))
    except pa.ArrowInvalid as e:
        line, message, _ = first_bad_csv_row(data, len(header))
        raise DataError(path, line, message if line is not None else f"bad CSV: {e}") from None
    out = CsvColumns(path, {c: table.column(c) for c in required}, data)
    if invalid:
        line, message, before = first_bad_csv_row(data, len(header))
        out.pending, out.limit = DataError(path, line, message), before
    return out


def _csv_rows(data: bytes) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, fields) of each data row, blank rows skipped, as Python's csv module reads
    them (strict: an unterminated quote is an error, not a field swallowing the rest of the file). A
    :class:`csv.Error` carries the line its row starts on as ``e.line``."""
    with io.StringIO(data.decode("utf-8", errors="replace").removeprefix("\ufeff"), newline="") as fh:
        reader = csv.reader(fh, strict=True)
        start = 1
        try:
            next(reader, None)
            start = reader.line_num + 1
            for row in reader:
                no, start = start, reader.line_num + 1
                if row:
                    yield no, row
        except csv.Error as e:
            e.line = start  # type: ignore[attr-defined]
            raise


def first_bad_csv_row(data: bytes, n_fields: int) -> tuple[int | None, str, int]:
    """(line, message, good rows before it) of the first row without ``n_fields`` fields, with an unterminated
    quote or a field over the size limit (the line where that row starts)."""
    before = 0
    try:
        for line, row in _csv_rows(data):
            if len(row) != n_fields:
                return line, f"wrong number of fields: {len(row)} (header has {n_fields})" + (
                    " - an unterminated quote?" if any("\n" in f for f in row) else ""), before
            before += 1
    except csv.Error as e:
        why = ("unterminated quote: the field runs to the end of the file" if "unexpected end of data" in str(e)
               else f"bad CSV: {e}")
        return getattr(e, "line", None), why, before
    return None, "malformed CSV", before


# ---------------------------------------------------------------------------- numbers and times
def to_float(column: Any) -> np.ndarray:
    """(R,) float64 of a string column, NaN where a value is not a number (surrounding spaces allowed)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return np.array(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)  # writable
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    col = pc.utf8_trim_whitespace(column)
    try:
        return np.array(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import pandas as pd

        return np.array(pd.to_numeric(pd.Series(col.to_numpy(zero_copy_only=False)), errors="coerce"), dtype=np.float64)


# ---------------------------------------------------------------------------- checks
def first_error(path: Path, line_of: LineOf, checks: Sequence[Check], limit: int | None = None) -> DataError | None:
    """The error of the first bad row over all checks (the first failing check within that row), as the
    reader that went row by row would have raised it; rows from ``limit`` on are not looked at."""
    best: tuple[int, int] | None = None
    for j, (bad, _) in enumerate(checks):
        rows = np.flatnonzero(bad[:limit] if limit is not None else bad)
        if len(rows) and (best is None or int(rows[0]) < best[0]):
            best = (int(rows[0]), j)
    if best is None:
        return None
    r, j = best
    return DataError(path, line_of(r), checks[j][1](r))


def id_check(column: Any, canon: Callable[[str], str], what: str) -> tuple[Ids, Check]:
    """Canonical ids of a string column and the check of the bad ones (``canon``'s ValueError says why, with
    '{what}' for the column's name)."""
    ids, bad = ids_from_arrow(column).canonical(canon)

    def message(r: int) -> str:
        value = ids[r]
        try:
            canon(value)
        except ValueError as e:
            return str(e).replace("{what}", what)
        return f"bad {what}: {value!r}"  # pragma: no cover - canon is deterministic

    return ids, (bad, message)


def float_check(column: Any, what: str) -> tuple[np.ndarray, Check]:
    """(R,) float64 of a string column and the check of the values that are not finite numbers."""
    values = to_float(column)

    def message(r: int) -> str:
        value = column[r].as_py()
        try:
            float(value)
        except ValueError:
            return f"{what} is not a number: {value!r}"
        return f"{what} is not a finite number: {value!r}"

    return values, (~np.isfinite(values), message)


def iso_seconds(values: Any) -> np.ndarray:
    """Epoch seconds of ISO-8601 date/times (no zone = UTC), NaN where a value is not one."""
    import pandas as pd

    t = pd.to_datetime(pd.Series(values, dtype=object), format="ISO8601", utc=True, errors="coerce")
    return np.array((t - pd.Timestamp(0, tz="UTC")).dt.total_seconds(), dtype=np.float64)


def time_check(column: Any, what: str) -> tuple[np.ndarray, Check]:
    """Epoch seconds from numbers or ISO-8601 text (naive times are UTC) and the check of the rest."""
    values = to_float(column)
    nan = np.flatnonzero(np.isnan(values))
    if len(nan):
        values[nan] = iso_seconds(column.take(nan).to_numpy(zero_copy_only=False))

    def message(r: int) -> str:
        if np.isfinite(values[r]):
            return f"{what} {column[r].as_py()!r} is out of range (at most {MAX_TIME:.3g} in absolute value)"
        return f"{what} is not a number (epoch seconds) or an ISO-8601 time: {column[r].as_py()!r}"

    return values, (~np.isfinite(values) | (np.abs(np.nan_to_num(values)) > MAX_TIME), message)


MAX_TIME = 9.2e18  # |time| beyond int64 (nanoseconds since 1970 fit): not a time in any unit (e.g. 1e300)


PLAUSIBLE_SECONDS = (0.0, 4102444800.0)  # 1970-01-01 .. 2100-01-01 as epoch seconds


def implausible_times(times: np.ndarray) -> tuple[int, int, int | None]:
    """(negative, after 2100 as epoch seconds, first such row) of valid times: a warning, not an error (they still
    order each user's interactions; milliseconds since 1970 are 'after 2100' as seconds)."""
    lo, hi = PLAUSIBLE_SECONDS
    neg, late = times < lo, times > hi
    rows = np.flatnonzero(neg | late)
    return int(neg.sum()), int(late.sum()), int(rows[0]) if len(rows) else None
