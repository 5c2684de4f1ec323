"""A saved retriever run loaded for use: its settings, the fitted retriever and the data split from its snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from palr.data import Split
from palr.retrieval.base import Retriever, load_retriever
from palr.runs.snapshot import load_run_split
from palr.runs.store import read_run


def load_run(run: str | Path, data_dir: str | Path | None = None) -> tuple[dict[str, Any], Retriever, Split]:
    """Load a retriever run and the split it was trained on, from the run's data snapshot (``data_dir``: raw data
    given again, checked against the snapshot's fingerprint, not used)."""
    cfg = read_run(run, "retriever")
    split = load_run_split(run, cfg, data_dir=data_dir)
    return cfg, load_retriever(Path(run) / "model"), split
