"""Run directories: config.json (everything needed to reproduce), weights, metrics, a training log.

A run is complete only when ``run.json`` exists: it is written last, atomically, so an interrupted
job never leaves a directory that looks complete. Its data lives in the snapshot (:mod:`palr.runs.snapshot`). Loading checks the data set fingerprint and the
run format version and refuses a mismatch with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from palr import __version__
from palr.core.errors import RunError
from palr.core.io import write_json
from palr.core.options import build
from palr.core.settings import DataSpec
from palr.data import as_spec
from palr.data.dataset import Dataset
from palr.runs.card import write_model_card
from palr.runs.safety import LOCK_FILE, lock_run, read_json, release_run

RUN_FORMAT = 1


log = logging.getLogger(__name__)


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


def catalog_fingerprints(dataset: Dataset) -> dict[str, str]:
    """sha256 of the catalogue text the prompts use: titles, and item attributes (tags, year, ...)."""
    cat = dataset.catalog
    titles = hashlib.sha256("\n".join(f"{i}\t{t}" for i, t in zip(cat.item_ids, cat.titles)).encode()).hexdigest()
    attrs = hashlib.sha256("\n".join(f"{i}\t{json.dumps(a, sort_keys=True, default=str)}"
                                     for i, a in zip(cat.item_ids, cat.attributes)).encode()).hexdigest()
    return {"titles": titles, "attributes": attrs}


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
            "interactions": dataset.n_interactions, "fingerprint": fingerprint(dataset),
            "catalog": catalog_fingerprints(dataset)}


ARGS_FILE = "args.json"  # the command's resolved options (``palr COMMAND --config RUN/args.json`` reruns it)


VOLATILE_ARGS = ("out", "overwrite", "data_dir", "run")  # where things are (inputs are checked by digest)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted((set(old) | set(new)) - set(VOLATILE_ARGS))
    return [f"{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys if old.get(k) != new.get(k)]


def begin_run(out: str | Path, overwrite: bool = True, args: dict[str, Any] | None = None) -> Path:
    """Prepare ``out`` for a run; an old completeness marker is removed first.

    With ``args`` (the command's resolved options plus fingerprints of its inputs) the directory is honest:
    ``out`` holding a run, checkpoints or files made with other ``args`` is refused (named differences),
    unless ``overwrite``, which empties it; the same ``args`` reuse it (a rerun resumes). ``args.json`` is
    written before any work starts.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is an existing file, not a run directory")
    lock_run(out)  # held until finish_run (or the process ends): a second writer is refused meanwhile
    if args is not None and out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        saved = out / ARGS_FILE
        old = read_json(saved) if saved.is_file() else None
        diff = ["it holds files of an unknown or older run"] if old is None else _differences(old, args)
        if diff and not overwrite:
            raise RunError(f"{out} holds a run made with other settings ({'; '.join(diff[:6])}"
                           f"{'; ...' if len(diff) > 6 else ''}): add --overwrite to replace it, or choose another --out")
        if diff:
            log.warning("replacing %s (%s)", out, "; ".join(diff[:6]))
            _empty(out)
    elif out.exists() and (out / "run.json").exists() and not overwrite:
        raise RunError(f"{out} already holds a run; choose another --out")
    if (out / "run.json").exists():
        (out / "run.json").unlink()
    out.mkdir(parents=True, exist_ok=True)
    if args is not None:
        write_json(out / ARGS_FILE, args)
    return out


def _empty(directory: Path) -> None:
    """Remove everything in ``directory`` except the writer's lock file (held by this job)."""
    for p in directory.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def tree_digest(directory: str | Path) -> str:
    """sha256 over a directory's file names and contents (an input run's identity)."""
    h = hashlib.sha256()
    root = Path(directory)
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.name != LOCK_FILE):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


SNAPSHOT_DIR = "data"  # the run's data snapshot (palr.runs.snapshot)


@dataclass
class RunConfig:
    """``config.json``: one shape for every run kind (retriever, PALR with an LLM or with the feature ranker)."""

    kind: str  # "retriever" or "palr"
    config: dict[str, Any]  # the kind's own settings (retriever: name, params, seed; palr: finetune or
    #                         feature_ranker, ranking, and the retriever run's settings)
    data: dict[str, Any]  # the data spec the data set was read with (flat DataSpec, paths absolute)
    inputs: dict[str, str]  # the runs it was made from ({"retriever_run": PATH} for a PALR run)
    dataset: dict[str, Any]  # dataset_info: name, sizes, fingerprints
    protocol: dict[str, Any]
    snapshot: str  # the folder of the data snapshot inside the run
    versions: dict[str, str]


def finish_run(out: Path, kind: str, dataset: Dataset, config: dict[str, Any],
               metrics: dict[str, Any] | None = None, *, data: dict[str, Any] | None = None,
               inputs: dict[str, str] | None = None) -> None:
    """Write config.json (a :class:`RunConfig`) + metrics.json, then run.json last (the completeness marker).

    ``data``: the flat data spec the data set was read with (default: its name); ``inputs``: the runs it was made
    from. The data snapshot (``palr.runs.snapshot``) is written or linked by the caller before."""
    doc = RunConfig(kind=kind, config=config, data=dict(data or {"dataset": dataset.name}), inputs=dict(inputs or {}),
                    dataset=dataset_info(dataset), protocol=dataset.protocol, snapshot=SNAPSHOT_DIR,
                    versions=versions())
    write_json(out / "config.json", asdict(doc))
    if metrics is not None:
        write_json(out / "metrics.json", metrics)
    write_json(out / "run.json", {"format": RUN_FORMAT, "kind": kind, "palr": __version__, "complete": True})

    write_model_card(out)
    release_run(out)


def read_run(directory: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Check a run directory and return its config.json content."""
    d = Path(directory)
    if not d.is_dir():
        raise RunError(f"run directory {d} does not exist")
    marker = d / "run.json"
    if not marker.exists():
        raise RunError(f"{d} is not a complete run (no run.json): it was interrupted or is not a run directory")
    meta = read_json(marker)
    if meta.get("format") != RUN_FORMAT:
        raise RunError(f"{d} was written with run format {meta.get('format')} (palr {meta.get('palr')}); "
                       f"this palr {__version__} reads format {RUN_FORMAT}. Retrain it.")
    if kind is not None and meta.get("kind") != kind:
        raise RunError(f"{d} is a {meta.get('kind')!r} run; this command needs a {kind!r} run")
    config = read_json(d / "config.json")
    if not isinstance(config.get("config"), dict) or not isinstance(config.get("dataset"), dict):
        raise RunError(f"{d / 'config.json'}: damaged run file (no 'config' or 'dataset' object)")
    return config


def run_data_spec(config: dict[str, Any], data_dir: str | Path | None = None) -> DataSpec:
    """The data spec a run was made from (``data_dir`` overrides where the named data sets live): only to check
    raw data given again against the run (the run itself reads its snapshot)."""
    saved = dict(config.get("data") or config["config"].get("data") or {"dataset": config["dataset"]["name"]})
    saved_dir = saved.pop("data_dir", None) or config["config"].get("data_dir") or None
    return as_spec(build(DataSpec, file=saved), data_dir or saved_dir)


def check_dataset(config: dict[str, Any], dataset: Dataset, directory: str | Path) -> None:
    """Refuse a run trained on another data set (or another preprocessing of it, or another catalogue)."""
    want = config["dataset"]
    same_name = want["name"] == dataset.name or (want["name"].startswith("csv:") and dataset.name.startswith("csv:"))
    if not same_name or want["fingerprint"] != fingerprint(dataset):
        raise RunError(f"run {directory} was trained on data set {want['name']!r} "
                       f"({want['users']} users / {want['items']} items, fingerprint {want['fingerprint'][:12]}), "
                       f"not on {dataset.name!r} ({dataset.n_users} / {dataset.n_items}, "
                       f"{fingerprint(dataset)[:12]}). Use the data set and preprocessing it was trained on.")
    saved = want.get("catalog")  # runs written before palr checked the catalogue have none
    if saved:
        now = catalog_fingerprints(dataset)
        changed = [k for k in ("titles", "attributes") if saved.get(k) != now[k]]
        if changed:
            raise RunError(f"run {directory}: the catalogue of {dataset.name!r} changed since the run was trained "
                           f"(item {' and '.join(changed)} differ); the prompts it learned use them. Restore the "
                           "items file it was trained with, or train a new run.")


def copy_tree_atomic(src: Path, dst: Path) -> None:
    """``dst`` becomes a fresh copy of ``src`` (built beside it, then renamed: never half a copy)."""
    build_dir_atomic(dst, lambda tmp: shutil.copytree(src, tmp))


def build_dir_atomic(dst: Path, build: Any) -> Path:
    """Call ``build(tmp)`` to write a directory at a temporary sibling, then rename it to ``dst``.

    A kill during ``build`` leaves ``dst`` as it was (absent or the previous complete version) and a
    ``.NAME.tmp`` sibling that the next call removes.
    """
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    build(tmp)
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst
