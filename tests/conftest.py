"""Shared fixtures: synthetic data for the core tests; real data only when PALR_DATA_DIR is set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from palr.data import Split
from palr.data.synthetic import synthetic_dataset


@pytest.fixture(scope="session")
def synth():
    return synthetic_dataset(n_users=200, n_items=120, seed=0)


@pytest.fixture(scope="session")
def synth_split(synth) -> Split:
    return Split.leave_one_out(synth)


def real_data_dir() -> Path | None:
    d = os.environ.get("PALR_DATA_DIR")
    return Path(d) if d and Path(d).is_dir() else None


@pytest.fixture
def data_dir_real() -> Path:
    d = real_data_dir()
    if d is None:
        pytest.skip("real data sets need PALR_DATA_DIR (e.g. ../shared/data)")
    return d


@pytest.fixture(scope="session")
def tiny_ml100k_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny evaluated PALR run on a synthetic ml-100k-format data set (see tests/tiny_runs.py)."""
    pytest.importorskip("transformers")
    from tiny_runs import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("tiny_ml100k"))
