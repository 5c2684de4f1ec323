"""Process hygiene and the console: importing palr changes nothing; the CLI's -v/-q/--debug do what they say."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from palr.data import Split


def test_importing_palr_sets_no_environment() -> None:
    """OMP_WAIT_POLICY was set at import in three modules, HF_HUB_OFFLINE for the whole process by the text retriever."""
    code = ("import os, palr, palr.train.retriever, palr.retrieval.sasrec, palr.retrieval.text, palr.train.finetune, "
            "palr.rank.pipeline\n"
            "print(sorted(k for k in ('OMP_WAIT_POLICY', 'HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE') if k in os.environ))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_fitting_leaves_the_global_random_state_alone(synth_split: Split) -> None:
    """fit_retriever seeded np.random and random globally; randomness now comes from each model's own seed."""
    import random

    from palr.train.retriever import fit_retriever

    np.random.seed(123)
    random.seed(123)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    fit_retriever("itemknn", synth_split, seed=7)
    assert np.array_equal(np.random.get_state()[1], before_np) and random.getstate() == before_py


def test_setup_levels_and_quiet_progress() -> None:
    from palr.core import console

    try:
        console.setup(quiet=True)
        assert not console.progress_enabled(True)
        handler = next(h for h in logging.getLogger().handlers if getattr(h, "_palr_console", False))
        assert handler.level == logging.ERROR
        console.setup(verbose=True)
        assert console.progress_enabled(True) and not console.progress_enabled(False)
        assert [h.level for h in logging.getLogger().handlers if getattr(h, "_palr_console", False)] == [logging.INFO]
    finally:
        console.setup()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    env = {**os.environ}
    env.pop("PALR_DATA_DIR", None)
    args = [sys.executable, "-c", "from palr.cli import main; main()", "data", "stats", "--dataset", "netflix",
            "--data-dir", str(tmp_path)]
    quiet = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and quiet.stderr.startswith("error: unknown data")
    loud = subprocess.run(args, env={**env, "PALR_DEBUG": "1"}, capture_output=True, text=True, check=False)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "MissingDataError" in loud.stderr


@pytest.mark.parametrize("flag", ["-v", "-q", "--debug"])
def test_global_flags_parse(flag: str) -> None:
    from palr.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([flag, "--version"])
    assert e.value.code == 0
