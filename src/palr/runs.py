"""Run directories: config.json (everything needed to reproduce), weights, metrics, a training log.

A run is complete only when ``run.json`` exists: it is written last, atomically, so an interrupted
job never leaves a directory that looks complete. Loading checks the data set fingerprint and the
run format version and refuses a mismatch with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from palr import __version__
from palr.data.dataset import Dataset
from palr.errors import RunError

RUN_FORMAT = 1
log = logging.getLogger(__name__)


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results and reports from colleagues
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fingerprint(dataset: Dataset) -> str:
    """sha256 over the preprocessed sequences and id maps: two data sets with the same value are the same."""
    h = hashlib.sha256()
    h.update("\n".join(dataset.user_ids).encode())
    h.update(b"\0")
    h.update("\n".join(dataset.catalog.item_ids).encode())
    for s in dataset.sequences:
        h.update(np.asarray(s, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"palr": __version__, "python": platform.python_version()}
    for pkg in ("torch", "numpy", "pandas", "scipy", "transformers", "peft", "tokenizers", "accelerate", "implicit"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def dataset_info(dataset: Dataset) -> dict[str, Any]:
    return {"name": dataset.name, "users": dataset.n_users, "items": dataset.n_items,
            "interactions": dataset.n_interactions, "fingerprint": fingerprint(dataset)}


def begin_run(out: str | Path, overwrite: bool = True) -> Path:
    """Prepare ``out`` for a new run: an old complete marker is removed first."""
    out = Path(out)
    if out.exists() and (out / "run.json").exists():
        if not overwrite:
            raise RunError(f"{out} already holds a run; choose another --out")
        (out / "run.json").unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def finish_run(out: Path, kind: str, dataset: Dataset, config: dict[str, Any],
               metrics: dict[str, Any] | None = None) -> None:
    """Write config.json + metrics.json, then run.json last (the completeness marker)."""
    write_json(out / "config.json", {"kind": kind, "config": config, "dataset": dataset_info(dataset),
                                     "protocol": dataset.protocol, "versions": versions()})
    if metrics is not None:
        write_json(out / "metrics.json", metrics)
    write_json(out / "run.json", {"format": RUN_FORMAT, "kind": kind, "palr": __version__, "complete": True})
    from palr.model_card import write_model_card  # the card reads the files just written

    write_model_card(out)


def read_run(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Check a run directory and return its config.json content."""
    d = Path(directory)
    if not d.is_dir():
        raise RunError(f"run directory {d} does not exist")
    marker = d / "run.json"
    if not marker.exists():
        raise RunError(f"{d} is not a complete run (no run.json): it was interrupted or is not a run directory")
    meta = json.loads(marker.read_text())
    if meta.get("format") != RUN_FORMAT:
        raise RunError(f"{d} was written with run format {meta.get('format')} (palr {meta.get('palr')}); "
                       f"this palr {__version__} reads format {RUN_FORMAT}. Retrain it.")
    if kind is not None and meta.get("kind") != kind:
        raise RunError(f"{d} is a {meta.get('kind')!r} run; this command needs a {kind!r} run")
    return json.loads((d / "config.json").read_text())


def check_dataset(config: dict[str, Any], dataset: Dataset, directory: str | Path) -> None:
    """Refuse a run trained on another data set (or another preprocessing of it)."""
    want = config["dataset"]
    if want["name"] != dataset.name or want["fingerprint"] != fingerprint(dataset):
        raise RunError(f"run {directory} was trained on data set {want['name']!r} "
                       f"({want['users']} users / {want['items']} items, fingerprint {want['fingerprint'][:12]}), "
                       f"not on {dataset.name!r} ({dataset.n_users} / {dataset.n_items}, "
                       f"{fingerprint(dataset)[:12]}). Use the data set and preprocessing it was trained on.")


def copy_tree_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
