"""A user's own interaction files (CSV or Parquet) and item files, read column by column.

Ids are text (an integral float such as '12.0' is the integer '12'); times are epoch seconds or ISO-8601
(naive = UTC). The first bad row in file order raises :class:`~palr.core.errors.DataError` with its line (CSV) or
row number (Parquet).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from palr.core.errors import DataError, MissingDataError
from palr.data.columns import (
    MAX_TIME,
    Check,
    Ids,
    first_error,
    id_check,
    ids_from_arrow,
    implausible_times,
    read_csv_columns,
    time_check,
)
from palr.data.sources import RawData, _csv_rows, _id_field, free_id

log = logging.getLogger(__name__)


def _arrow_ids(column: Any, col: str) -> tuple[Ids, Check]:
    """Ids of a Parquet column (text, integers, or floats that are whole numbers) and their check; a Parquet
    row r is reported as line r + 1."""
    import pyarrow as pa
    import pyarrow.compute as pc

    null = column.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_floating(column.type):
        v = pc.fill_null(column, 0.0).to_numpy(zero_copy_only=False)
        finite = np.isfinite(v)
        frac = ~null & (~finite | (v != np.floor(np.where(finite, v, 0.0))))
        ids = ids_from_arrow(pc.cast(pa.array(np.where(frac, 0.0, v).astype(np.int64)), pa.string()))
        bad, why = frac, (lambda r: f"{col} is not a whole number: {float(v[r])!r}")
    else:
        ids, (bad, why) = id_check(pc.fill_null(pc.cast(column, pa.string()), ""), free_id, col)

    def message(r: int) -> str:
        return f"row {r + 1}: " + (f"empty {col}" if null[r] else why(r))

    return ids, (null | bad, message)


def _arrow_times(column: Any, col: str) -> tuple[np.ndarray, Check]:
    """Epoch seconds of a Parquet column: numbers, timestamps (naive = UTC) or text (numbers or ISO-8601)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        us = pc.cast(pc.cast(column, pa.timestamp("us", tz=getattr(t, "tz", None) or "UTC")), pa.int64())
        out = pc.fill_null(pc.cast(us, pa.float64()), np.nan).to_numpy(zero_copy_only=False) / 1e6
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        out = pc.fill_null(pc.cast(column, pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    else:
        out, _ = time_check(pc.fill_null(pc.cast(column, pa.string()), ""), col)

    def message(r: int) -> str:
        if np.isfinite(out[r]):
            return f"row {r + 1}: {col} {column[r].as_py()!r} is out of range (at most {MAX_TIME:.3g} in absolute value)"
        return f"row {r + 1}: {col} is not a finite number or ISO-8601 time: {column[r].as_py()!r}"

    return out, (~np.isfinite(out) | (np.abs(np.nan_to_num(out)) > MAX_TIME), message)


ID_TYPES = "text, integers or whole floats"


def _typed_column(path: Path, table: Any, col: str, times: bool = False) -> Any:
    """``table.column(col)`` when its Parquet type can hold ids (or times); else one line naming the column."""
    import pyarrow as pa

    column = table.column(col)
    t = column.type
    if pa.types.is_dictionary(t):
        t = t.value_type
    ok = (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
          or pa.types.is_floating(t) or (times and (pa.types.is_timestamp(t) or pa.types.is_date(t))))
    if not ok:
        want = "times (numbers, timestamps or ISO-8601 text)" if times else f"ids ({ID_TYPES})"
        raise DataError(path, None, f"column {col!r} has type {column.type}, which cannot hold {want}")
    if pa.types.is_dictionary(column.type):
        column = column.cast(t)
    return column


def _warn_times(path: Path, times: np.ndarray, col: str, line_of: Any) -> None:
    """Warn (with the count and the first line) about negative times and times after 2100 as epoch seconds among
    plausible ones (a few damaged rows); a file whose times are all outside is in another unit and ordered alike."""
    neg, late, first = implausible_times(times)
    if first is not None and neg + late < len(times):  # all of them: a consistent unit (ms, synthetic), no note
        log.warning("%s: %d negative and %d after-2100 %s value(s) as epoch seconds (first on line %s: %r); they "
                    "only order each user's interactions: check the unit (seconds, or ISO-8601)", path, neg, late, col,
                    line_of(first), float(times[first]))


def _read_parquet(path: Path, columns: list[str]) -> Any:
    """A pyarrow Table of ``columns`` (all when empty) of a Parquet file."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:  # noqa: BLE001 - pyarrow raises several unrelated types for a bad file
        raise DataError(path, None, f"cannot read Parquet ({type(e).__name__}: {e})") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(path, None, f"missing column(s) {missing}; columns are {names}")
    try:
        return pq.read_table(path, columns=columns or None)
    except Exception as e:  # noqa: BLE001
        raise DataError(path, None, f"cannot read Parquet ({type(e).__name__}: {e})") from None


def _is_parquet(path: Path) -> bool:
    return path.suffix in (".parquet", ".pq")


def read_user_file(path: Path, user_col: str, item_col: str, time_col: str | None,
                   items_file: Path | None = None, *, title_col: str = "title", tags_col: str = "") -> RawData:
    """A user's own interactions (CSV or Parquet) and an optional item file (CSV or Parquet: id, title,
    tags, attribute columns). Times are epoch seconds or ISO-8601; ids are text, whole floats as integers.
    Read column by column (pyarrow); the first bad row in file order is reported with its line."""
    if not path.exists():
        raise MissingDataError(f"interactions file {path} does not exist")
    required = [c for c in (user_col, item_col, time_col) if c]
    times: np.ndarray | None = None
    if _is_parquet(path):
        table = _read_parquet(path, required)
        users, cu = _arrow_ids(_typed_column(path, table, user_col), user_col)
        items, ci = _arrow_ids(_typed_column(path, table, item_col), item_col)
        checks = [cu, ci]
        if time_col:
            times, ct = _arrow_times(_typed_column(path, table, time_col, times=True), time_col)
            checks.append(ct)
        err = first_error(path, lambda r: r + 1, checks)
        if err is not None:
            raise err
        if times is not None and time_col:
            _warn_times(path, times, time_col, lambda r: f"row {r + 1}")
    else:
        csv_table = read_csv_columns(path, required)
        users, cu = id_check(csv_table.columns[user_col], free_id, user_col)
        items, ci = id_check(csv_table.columns[item_col], free_id, item_col)
        checks = [cu, ci]
        if time_col:
            times, ct = time_check(csv_table.columns[time_col], time_col)
            checks.append(ct)
        csv_table.raise_first(checks)
        if times is not None and time_col:
            _warn_times(path, times, time_col, csv_table.line_of)
    titles: dict[str, str] = {}
    attrs: dict[str, dict[str, Any]] = {}
    if items_file is not None:
        titles, attrs = read_items_file(items_file, item_col, title_col, tags_col)
        check_items_match(items_file, set(titles), items.used())
    return RawData(users, items, times, titles, attrs, "items", [str(path)] + ([str(items_file)] if items_file else []))


def _item_rows(items_file: Path, item_col: str) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    """The id column and the rows (line number, column -> value) of an items file, CSV or Parquet."""
    if _is_parquet(items_file):
        table = _read_parquet(items_file, [])
        cols = [str(c) for c in table.column_names]
        if not cols:
            raise DataError(items_file, None, "no columns")
        id_col = item_col if item_col in cols else cols[0]
        id_column, check = _arrow_ids(_typed_column(items_file, table, id_col), id_col)
        err = first_error(items_file, lambda r: r + 1, [check])
        if err is not None:
            raise err
        ids = id_column.tolist()
        df = table.to_pandas()
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
    matched = len(interaction_ids & item_ids)
    if interaction_ids and matched == 0:
        raise DataError(items_file, None, f"none of its {len(item_ids)} item ids matches an item of the interactions "
                                          f"(items file: {sorted(item_ids)[:3]}; interactions: "
                                          f"{sorted(interaction_ids)[:3]}); check --item-col and the id column")
    if matched < len(interaction_ids):
        log.warning(
            "%s describes %d of the %d interaction items (%.1f%%); the others show their ids as titles",
            items_file, matched, len(interaction_ids), 100.0 * matched / len(interaction_ids))
