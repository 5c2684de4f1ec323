"""What the console shows: progress bars (tqdm, the one progress library), results, warnings and errors.

INFO log lines go to the run's log file (``train.log``), not to the console, unless ``-v``; ``--quiet``
leaves errors only. Process-wide settings (OpenMP threads, dependency warnings) are applied here, once,
by the CLI; importing palr changes nothing in the environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

_state = {"quiet": False, "debug": False}

# dependency warnings that say nothing to a palr user (each seen on the normal path)
KNOWN_WARNINGS = [
    r".*pin_memory.*",  # torch DataLoader inside the HF Trainer on a CPU-only machine
    r".*`resume_download` is deprecated.*",
    r".*torch_dtype.*is deprecated.*",
    r".*loss_type=None.*",
    r".*Attention mask.*not set.*",
    r".*generation flags are not valid.*",
    r".*is_gradient_checkpointing.*is deprecated.*",  # transformers, on loading a LoRA adapter (peft)
]


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get("PALR_DEBUG", "") not in ("", "0")


def progress_enabled(progress: bool = True) -> bool:
    """Whether to draw a bar: the caller's wish, unless ``--quiet``."""
    return progress and not _state["quiet"]


def silence_known_warnings() -> None:
    """Known dependency warnings, INFO chatter and weight-loading bars off (the CLI's normal path).

    transformers is not imported for this (it is slow to import): when it is not loaded yet, its
    environment settings are given instead, which it reads when it loads.
    """
    import sys

    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("transformers", "transformers.modeling_utils", "transformers.trainer", "peft", "httpx",
                 "sentence_transformers", "implicit"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def setup(verbose: bool = False, quiet: bool = False, debug: bool = False) -> None:
    """The CLI's process settings: console log level, known warnings, OpenMP waiting policy."""
    _state["quiet"], _state["debug"] = quiet, debug or debug_enabled()
    # OpenMP threads that busy-wait make torch crawl on a small shared CPU; read when torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    level = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_palr_console", False):
            root.removeHandler(h)
    handler = logging.StreamHandler()
    handler.setLevel(level)  # the palr logger may be at INFO for a run's log file; the console keeps this level
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler._palr_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(min(level, logging.WARNING))
    if not _state["debug"]:
        silence_known_warnings()


@contextlib.contextmanager
def log_to(path: Path) -> Iterator[None]:
    """Copy the ``palr`` loggers' INFO records into ``path`` for the duration (the run's train.log)."""
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("palr")
    old = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
        handler.close()
