"""Data sets: where they live, how they are read, and the canonical preprocessing."""

from __future__ import annotations

import os
from pathlib import Path

from palr.data.dataset import Catalog, Dataset, Split, Stage
from palr.data.preprocess import preprocess
from palr.data.sources import (
    RawData,
    read_amazon,
    read_ml1m,
    read_ml100k,
    read_ml_latest,
    read_user_file,
)
from palr.errors import MissingDataError

__all__ = ["KNOWN_DATASETS", "Catalog", "Dataset", "Split", "Stage", "data_dir", "load_dataset", "load_split"]

KNOWN_DATASETS = ["ml-100k", "ml-1m", "ml-latest-small", "amazon-<category> (e.g. amazon-beauty)", "csv:PATH"]


def data_dir(flag: str | Path | None = None) -> Path:
    """--data-dir, else $PALR_DATA_DIR, else ~/.cache/palr/data."""
    if flag:
        return Path(flag).expanduser()
    env = os.environ.get("PALR_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/palr/data").expanduser()


def read_raw(name: str, root: Path, *, user_col: str = "user", item_col: str = "item",
             time_col: str | None = "timestamp", items_file: str | Path | None = None) -> RawData:
    if name.startswith(("csv:", "file:")):
        path = Path(name.split(":", 1)[1]).expanduser()
        return read_user_file(path, user_col, item_col, time_col, Path(items_file) if items_file else None)
    if name == "ml-100k":
        return read_ml100k(root / name)
    if name == "ml-1m":
        return read_ml1m(root / name)
    if name.startswith("ml-latest"):
        return read_ml_latest(root / name, name)
    if name.startswith("amazon-") and len(name) > len("amazon-"):
        return read_amazon(root / name, name)
    raise MissingDataError(f"unknown data set {name!r}; known: {', '.join(KNOWN_DATASETS)}")


def load_dataset(name: str, data_dir_flag: str | Path | None = None, *, min_count: int = 5,
                 **user_file_options: object) -> Dataset:
    """Read and preprocess a data set by name (see KNOWN_DATASETS)."""
    root = data_dir(data_dir_flag)
    raw = read_raw(name, root, **user_file_options)  # type: ignore[arg-type]
    return preprocess(raw, name, min_count=min_count)


def load_split(name: str, data_dir_flag: str | Path | None = None, **kw: object) -> Split:
    return Split.leave_one_out(load_dataset(name, data_dir_flag, **kw))
