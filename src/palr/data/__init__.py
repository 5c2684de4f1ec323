"""Data sets: where they live, how they are read, and the canonical preprocessing."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from palr.core.errors import MissingDataError
from palr.core.settings import DataSpec
from palr.data.dataset import Catalog, Dataset, Split, Stage
from palr.data.preprocess import preprocess
from palr.data.sources import (
    RawData,
    read_amazon,
    read_ml1m,
    read_ml100k,
    read_ml_latest,
)
from palr.data.userfiles import read_user_file

__all__ = ["KNOWN_DATASETS", "Catalog", "DataSpec", "Dataset", "Split", "Stage", "data_dir", "load_dataset", "load_split"]

KNOWN_DATASETS = ["ml-100k", "ml-1m", "ml-latest-small", "amazon-<category> (e.g. amazon-beauty)", "csv:PATH"]


def data_dir(flag: str | Path | None = None) -> Path:
    """--data-dir, else $PALR_DATA_DIR, else ~/.cache/palr/data."""
    if flag:
        return Path(flag).expanduser()
    env = os.environ.get("PALR_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/palr/data").expanduser()


def as_spec(spec: DataSpec | str, data_dir_flag: str | Path | None = None, **options: object) -> DataSpec:
    """A DataSpec from a spec or from a data set name and the csv options (user_col, items_file, ...)."""
    if isinstance(spec, DataSpec):
        return replace(spec, data_dir=Path(data_dir_flag)) if data_dir_flag else spec
    if options.get("time_col", "timestamp") is None:
        options["time_col"] = ""
    if options.get("items_file") is not None:
        options["items_file"] = Path(options["items_file"])  # type: ignore[arg-type]
    return DataSpec(dataset=spec, data_dir=Path(data_dir_flag) if data_dir_flag else None, **options)  # type: ignore[arg-type]


def read_raw(spec: DataSpec | str, root: Path | None = None, **options: object) -> RawData:
    """The raw interactions and catalogue of a data set (a DataSpec, or a name, its root and csv options)."""
    spec = as_spec(spec, root, **options)
    name, root = spec.dataset, data_dir(spec.data_dir)
    if spec.is_file:
        path = Path(name.split(":", 1)[1]).expanduser()
        return read_user_file(path, spec.user_col, spec.item_col, spec.time_col or None, spec.items_file,
                              title_col=spec.title_col, tags_col=spec.tags_col)
    if name == "ml-100k":
        return read_ml100k(root / name)
    if name == "ml-1m":
        return read_ml1m(root / name)
    if name.startswith("ml-latest"):
        return read_ml_latest(root / name, name)
    if name.startswith("amazon-") and len(name) > len("amazon-"):
        return read_amazon(root / name, name)
    raise MissingDataError(f"unknown data set {name!r}; known: {', '.join(KNOWN_DATASETS)}")


def load_dataset(spec: DataSpec | str, data_dir_flag: str | Path | None = None, *, min_count: int = 5,
                 **options: object) -> Dataset:
    """Read and preprocess a data set: a DataSpec, or a name (see KNOWN_DATASETS) with its csv options."""
    spec = as_spec(spec, data_dir_flag, **options)
    spec.require()
    return preprocess(read_raw(spec), spec.dataset, min_count=min_count)


def load_split(spec: DataSpec | str, data_dir_flag: str | Path | None = None, **options: object) -> Split:
    return Split.leave_one_out(load_dataset(spec, data_dir_flag, **options))
