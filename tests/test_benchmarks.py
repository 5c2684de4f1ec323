"""The benchmark scripts still run against the package (benchmarks/scale.py imported a removed function)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scale_benchmark_steps_run_on_a_tiny_file(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    scale = load("scale")
    csv_path = scale.write_csv(tmp_path / "inter.csv", 3000)
    lines = csv_path.read_text().splitlines()
    assert lines[0].replace('"', "") == "user,item,timestamp" and len(lines) == 3001
    out = scale.step("evaluate", csv_path, eval_users=20)  # trains a one-epoch SASRec, ranks 20 users twice
    assert out["popularity_users_per_s"] > 0 and out["sasrec_users_per_s"] > 0 and out["users"] >= 20
    with pytest.raises(SystemExit) as stop:
        scale.main(["--help"])
    assert stop.value.code == 0
