"""Retriever runs: fit on the training split, validate, save; evaluate a saved run on test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from palr.data import Split, load_split
from palr.retrieval.base import Retriever, load_retriever
from palr.runs.store import check_dataset, read_run, run_data_spec


def load_run(run: str | Path, data_dir: str | Path | None = None) -> tuple[dict[str, Any], Retriever, Split]:
    """Load a retriever run and the split it was trained on (refused if the data differ)."""
    cfg = read_run(run, "retriever")
    split = load_split(run_data_spec(cfg, data_dir))
    check_dataset(cfg, split.dataset, run)
    return cfg, load_retriever(Path(run) / "model"), split
