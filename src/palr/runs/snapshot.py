"""A run's data snapshot: the preprocessed data set saved inside the run, so that a run stands alone.

``palr train`` (and ``palr tune``'s best run) writes ``RUN/data/``; a PALR run (``palr finetune``) links its
retriever run's snapshot. Every later command (finetune, evaluate, recommend, serve, report, compare) reads the
run's snapshot through :func:`load_run_split` and never the raw files: a run can be moved to another machine
with no data directory. Files (no pickle anywhere: ``np.load(allow_pickle=False)``)::

    data/sequences.npz   items (int64, every user's sequence concatenated, oldest first), offsets (int64, n_users + 1)
    data/users.json      {"user_ids": [...], "attributes": [...] | null}
    data/catalog.json    {"kind": ..., "item_ids": [...], "titles": [...], "attributes": [...]}
    data/manifest.json   SnapshotManifest (written last): sizes, protocol, fingerprints, sha256 of every file

Loading checks every file's sha256 and the data set fingerprint; a damaged snapshot is one :class:`RunError`
line naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from palr.core.errors import RunError
from palr.core.io import json_default, sha256_file, write_json
from palr.core.settings import DataSpec
from palr.data import load_dataset
from palr.data.dataset import Catalog, Dataset, Split
from palr.runs.store import (
    SNAPSHOT_DIR,
    build_dir_atomic,
    catalog_fingerprints,
    check_dataset,
    fingerprint,
    read_run,
    run_data_spec,
)

MANIFEST = "manifest.json"
SNAPSHOT_FORMAT = 1
FILES = ("sequences.npz", "users.json", "catalog.json")


@dataclass(frozen=True)
class SnapshotManifest:
    """What ``data/manifest.json`` holds: enough to check the snapshot and to describe the data set."""

    name: str
    users: int
    items: int
    interactions: int
    kind: str
    protocol: dict[str, Any]
    fingerprint: str  # palr.runs.store.fingerprint (sequences and id maps)
    catalog: dict[str, str]  # palr.runs.store.catalog_fingerprints (titles, attributes)
    files: dict[str, str]  # file name -> sha256
    format: int = SNAPSHOT_FORMAT
    note: str = field(default="the preprocessed data set this run was trained on (palr.runs.snapshot)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SnapshotManifest:
        known = set(cls.__dataclass_fields__)
        missing = known - set(d) - {"format", "note"}
        if missing:
            raise ValueError(f"missing keys {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in known})


def _plain(value: Any) -> Any:
    """Attributes as JSON keeps them (tuples -> lists, numpy scalars -> Python), so that the catalogue
    fingerprint of the saved data set is that of the loaded one."""
    return json.loads(json.dumps(value, default=_default))


def _default(o: Any) -> Any:
    try:
        return json_default(o)
    except TypeError:
        return str(o)  # any other attribute value: its text


def save_snapshot(directory: str | Path, dataset: Dataset) -> SnapshotManifest:
    """Write ``dataset`` as a snapshot directory (built beside it and renamed: never half a snapshot)."""
    directory = Path(directory)
    cat = dataset.catalog
    lengths = np.array([len(s) for s in dataset.sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = (np.concatenate([np.asarray(s, dtype=np.int64) for s in dataset.sequences]) if dataset.sequences
             else np.zeros(0, dtype=np.int64))
    manifest: dict[str, SnapshotManifest] = {}

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        np.savez_compressed(tmp / "sequences.npz", items=items, offsets=offsets)
        write_json(tmp / "users.json", {"user_ids": list(dataset.user_ids), "attributes": _plain(
            dataset.user_attributes) if dataset.user_attributes is not None else None})
        write_json(tmp / "catalog.json", {"kind": cat.kind, "item_ids": list(cat.item_ids), "titles": list(cat.titles),
                                          "attributes": _plain(cat.attributes)})
        m = SnapshotManifest(name=dataset.name, users=dataset.n_users, items=dataset.n_items,
                             interactions=int(offsets[-1]), kind=cat.kind, protocol=_plain(dataset.protocol),
                             fingerprint=fingerprint(dataset), catalog=catalog_fingerprints(dataset),
                             files={f: sha256_file(tmp / f) for f in FILES})
        write_json(tmp / MANIFEST, asdict(m))
        manifest["m"] = m

    build_dir_atomic(directory, build)
    return manifest["m"]


def read_manifest(directory: str | Path) -> SnapshotManifest:
    path = Path(directory) / MANIFEST
    try:
        m = SnapshotManifest.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise RunError(f"data snapshot {path.parent} is damaged: {path} is missing") from None
    except (ValueError, TypeError, OSError) as e:
        raise RunError(f"data snapshot {path.parent} is damaged: {path} is unreadable ({e})") from None
    if m.format != SNAPSHOT_FORMAT:
        raise RunError(f"data snapshot {path.parent} has format {m.format}; this palr reads format "
                       f"{SNAPSHOT_FORMAT}. Retrain the run.")
    return m


def load_snapshot(directory: str | Path) -> Dataset:
    """The data set saved by :func:`save_snapshot`; every file is checked (sha256) and so is the fingerprint."""
    d = Path(directory)
    m = read_manifest(d)
    for name in FILES:
        path = d / name
        if not path.is_file():
            raise RunError(f"data snapshot {d} is damaged: {path} is missing")
        if sha256_file(path) != m.files.get(name):
            raise RunError(f"data snapshot {d} is damaged: {path} does not match its sha256 in {MANIFEST}")
    try:
        with np.load(d / "sequences.npz", allow_pickle=False) as z:
            items, offsets = z["items"].astype(np.int64, copy=False), z["offsets"].astype(np.int64, copy=False)
        users = json.loads((d / "users.json").read_text(encoding="utf-8"))
        cat = json.loads((d / "catalog.json").read_text(encoding="utf-8"))
        sequences = [items[offsets[u]:offsets[u + 1]] for u in range(len(offsets) - 1)]
        catalog = Catalog(item_ids=cat["item_ids"], titles=cat["titles"], attributes=cat["attributes"],
                          kind=cat["kind"])
        ds = Dataset(name=m.name, user_ids=users["user_ids"], sequences=sequences, catalog=catalog,
                     protocol=m.protocol, user_attributes=users.get("attributes"))
    except (KeyError, ValueError, TypeError, IndexError, OSError) as e:
        raise RunError(f"data snapshot {d} is damaged: {e}") from None
    if (ds.n_users, ds.n_items) != (m.users, m.items) or fingerprint(ds) != m.fingerprint:
        raise RunError(f"data snapshot {d} is damaged: {d / 'sequences.npz'} does not give the data set of its "
                       f"fingerprint {m.fingerprint[:12]}")
    if catalog_fingerprints(ds) != m.catalog:
        raise RunError(f"data snapshot {d} is damaged: {d / 'catalog.json'} does not match its fingerprint")
    return ds


def link_snapshot(src_run: str | Path, dst_run: str | Path) -> None:
    """``dst_run/data`` becomes ``src_run``'s snapshot (hard links where the file system allows, else copies;
    snapshot files are never changed in place, so sharing them is safe)."""
    src = Path(src_run) / SNAPSHOT_DIR
    read_manifest(src)  # refuse a run with no (or a damaged) snapshot before linking anything

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for name in (*FILES, MANIFEST):
            try:
                os.link(src / name, tmp / name)
            except OSError:
                shutil.copy2(src / name, tmp / name)

    build_dir_atomic(Path(dst_run) / SNAPSHOT_DIR, build)


def has_snapshot(run: str | Path) -> bool:
    return (Path(run) / SNAPSHOT_DIR / MANIFEST).is_file()


def load_run_split(run: str | Path, config: dict[str, Any] | None = None, *,
                   data_dir: str | Path | None = None, data: DataSpec | None = None) -> Split:
    """The split a run was trained on, from the run's own snapshot (no raw file is read).

    Raw data given again (``data_dir``: where the run's named data set lives; ``data``: a data spec) is read and
    checked against the run's fingerprint (refused if it differs), never used in place of the snapshot."""
    run = Path(run)
    cfg = config if config is not None else read_run(run)
    if not has_snapshot(run):
        raise RunError(f"run {run} has no data snapshot (made by an older palr): retrain it with this palr "
                       "(palr train, then palr finetune for a PALR run)")
    ds = load_snapshot(run / SNAPSHOT_DIR)  # checked against its manifest's fingerprints
    m = read_manifest(run / SNAPSHOT_DIR)
    want = cfg["dataset"]
    if m.fingerprint != want["fingerprint"] or (want.get("catalog") and m.catalog != want["catalog"]):
        raise RunError(f"run {run}: its data snapshot ({m.name}, fingerprint {m.fingerprint[:12]}) is not the data "
                       f"set its config.json names ({want['name']}, {want['fingerprint'][:12]}): retrain the run")
    if data_dir is not None or data is not None:
        check_raw_data(run, data if data is not None else data_dir, cfg)
    return Split.leave_one_out(ds)


def check_raw_data(run: str | Path, data: DataSpec | str | Path, config: dict[str, Any] | None = None) -> None:
    """Raw data the user gave with a run (a data spec, or the directory of the run's named data set): read, and
    refused unless it is the data set the run was trained on."""
    cfg = config if config is not None else read_run(run)
    spec = data if isinstance(data, DataSpec) else run_data_spec(cfg, data)
    check_dataset(cfg, load_dataset(spec), run)


__all__ = ["SNAPSHOT_DIR", "SnapshotManifest", "check_raw_data", "has_snapshot", "link_snapshot", "load_run_split", "load_snapshot",
           "read_manifest", "save_snapshot"]
