"""A run directory is data, never configuration, and never overwritten by accident.

* :func:`inside_run`: every path a run file names (``llm_dir``, ``features.dir``, ``ranker_dir``, ...) must
  resolve inside the run directory (symbolic links followed); anything else is a :class:`RunError`.
* :func:`check_outputs`: the one check every writing command runs: an output file (``--out``, ``--predictions``,
  ``--per-user``, a report) must not resolve inside an input run directory, must not be a directory, and its
  folder must be writable.
* :class:`RunLock` (``RUN/.lock``, ``fcntl.flock``): taken by :func:`palr.runs.store.begin_run` and held until
  :func:`palr.runs.store.finish_run` (or the process ends); a second writer is refused while a job holds it.
* :func:`read_json`, :func:`load_safetensors`, :func:`read_text`: a damaged run file is one line naming it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

from palr.core.errors import InputError, RunError

__all__ = ["LOCK_FILE", "RunLock", "check_outputs", "inside_run", "keys_of", "load_npz", "load_safetensors", "lock_run",
           "read_json", "read_text", "release_run", "safetensors_metadata"]


LOCK_FILE = ".lock"


# ---------------------------------------------------------------------------- paths a run names
def inside_run(run: str | Path, rel: str | Path, what: str = "a path") -> Path:
    """``run / rel`` when it resolves inside ``run`` (symlinks followed); else :class:`RunError`.

    Absolute paths, ``..`` and links leaving the run are refused: a run file is data someone may have copied,
    and must not make palr read (or send) files from elsewhere."""
    root = Path(run).resolve()
    rel_s = str(rel)
    if not rel_s or "\0" in rel_s:
        raise RunError(f"{run}: {what} in the run's files is empty or invalid ({rel_s[:80]!r})")
    target = (root / rel_s).resolve()
    if target != root and root not in target.parents:
        raise RunError(f"{run}: {what} {rel_s[:200]!r} in the run's files points outside the run directory; "
                       "a run may only name files inside itself")
    return target


def _is_under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# ---------------------------------------------------------------------------- outputs never overwrite inputs
def check_outputs(outputs: dict[str, str | Path | None], inputs: Iterable[str | Path | None] = (),
                  *, directories: Iterable[str] = ()) -> None:
    """Refuse outputs that would overwrite an input run, or that cannot be written, before any work starts.

    ``outputs``: {flag name: path or None}; ``inputs``: run (or model) directories the command reads;
    ``directories``: the flags among ``outputs`` that name a directory to create (the others name files).
    One line naming the flag and the path (:class:`InputError`, exit 2)."""
    dirs = set(directories)
    roots = [Path(p).resolve() for p in inputs if p is not None and Path(p).exists()]
    for flag, raw in outputs.items():
        if raw is None or str(raw) == "":
            continue
        path = Path(raw).expanduser()
        resolved = path.resolve()
        for root in roots:
            if _is_under(resolved, root) or (flag in dirs and _is_under(root, resolved)):
                raise InputError(f"{flag} {raw} is inside the input run {root}: outputs never overwrite a run's "
                                 "files; write it elsewhere")
        if flag in dirs:
            if path.exists() and not path.is_dir():
                raise InputError(f"{flag} {raw} is an existing file, not a directory")
            parent = path if path.is_dir() else _existing_parent(path)
        else:
            if path.is_dir():
                raise InputError(f"{flag} {raw} is a directory; give a file name")
            parent = _existing_parent(path)
            if parent is not None and not parent.is_dir():
                raise InputError(f"{flag} {raw}: {parent} is a file, not a directory")
            if path.exists() and not os.access(path, os.W_OK):
                raise InputError(f"{flag} {raw} is not writable")
        if parent is not None and parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {raw}: the directory {parent} is not writable")


def _existing_parent(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (the folder the file or its missing folders go into)."""
    for p in path.absolute().parents:
        if p.exists():
            return p
    return None


# ---------------------------------------------------------------------------- one writer per run directory
class RunLock:
    """An exclusive, non-blocking ``flock`` on ``RUN/.lock``; refused with one line while another job holds it."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"cannot write the run directory {self.directory}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise RunError(f"{self.directory} is being written by another job{who}: wait for it to finish, or "
                           f"choose another --out (lock {self.path})") from None
        except OSError as e:
            os.close(fd)
            raise RunError(f"cannot lock {self.path}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD: dict[Path, RunLock] = {}  # the run directories this process is writing (re-entrant within a process)
_HELD_LOCK = threading.Lock()


def lock_run(directory: str | Path) -> RunLock:
    """Take (or keep, when this process already holds it) the writer's lock of a run directory."""
    key = Path(directory).absolute()
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None:
            return held
        lock = RunLock(key).acquire()
        _HELD[key] = lock
        return lock


def release_run(directory: str | Path) -> None:
    """Release the lock :func:`lock_run` took (a finished run); a no-op when not held."""
    with _HELD_LOCK:
        lock = _HELD.pop(Path(directory).absolute(), None)
    if lock is not None:
        lock.release()


# ---------------------------------------------------------------------------- damaged files: one line
def read_text(path: str | Path) -> str:
    """A run file's text; missing or undecodable -> :class:`RunError` naming it."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunError(f"{p} is missing: the run is incomplete") from None
    except UnicodeDecodeError as e:
        raise RunError(f"{p} is damaged: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise RunError(f"cannot read {p}: {e.strerror or e}") from None


def read_json(path: str | Path, kind: type | None = dict) -> Any:
    """A run's JSON file; damaged -> :class:`RunError` naming the file and the line."""
    p = Path(path)
    text = read_text(p)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunError(f"{p}:{e.lineno}: damaged JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise RunError(f"{p}: damaged JSON (nested too deeply)") from None
    if kind is not None and not isinstance(doc, kind):
        raise RunError(f"{p}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                       f"got {type(doc).__name__}")
    return doc


def load_safetensors(path: str | Path, framework: str = "numpy") -> dict[str, Any]:
    """Tensors of a ``.safetensors`` file; missing or damaged -> :class:`RunError` naming it."""
    from safetensors import SafetensorError

    p = Path(path)
    if not p.is_file():
        raise RunError(f"{p} is missing: the run is incomplete")
    try:
        if framework == "torch":
            from safetensors.torch import load_file as load_torch

            return load_torch(str(p))
        from safetensors.numpy import load_file as load_numpy

        return load_numpy(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{p} is damaged: {' '.join(str(e).split())[:200]}") from None


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file; damaged -> :class:`RunError`."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    try:
        with safe_open(str(p), "np") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{p} is damaged: {' '.join(str(e).split())[:200]}") from None


def load_npz(path: str | Path, keys: Iterable[str] = ()) -> dict[str, Any]:
    """The arrays of a ``.npz`` file (no pickles); damaged or lacking ``keys`` -> :class:`RunError`."""
    import zipfile

    import numpy as np

    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise RunError(f"{p} is damaged: {' '.join(str(e).split())[:200]}") from None
    missing = [k for k in keys if k not in out]
    if missing:
        raise RunError(f"{p} is damaged: no {', '.join(missing)}")
    return out


def keys_of(doc: dict[str, Any], path: str | Path, *keys: str) -> None:
    """Refuse a run file that lacks required keys (one line naming the file and the keys)."""
    missing = [k for k in keys if k not in doc]
    if missing:
        raise RunError(f"{path}: damaged run file, missing {', '.join(missing)}")

