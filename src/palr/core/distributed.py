"""Several processes under a launcher (``torchrun``, ``accelerate launch``): who this process is, which users it
takes, and how results come back together. With one process every function here is a no-op, so the single-process
path is unchanged.

Launchers start N copies of the same command with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set (and
``MASTER_ADDR``/``MASTER_PORT``). :func:`init` joins the process group (``nccl`` on CUDA, ``gloo`` on CPU) unless
the Trainer already did. Work over users is split by :func:`shard` into contiguous blocks of whole chunks
(a chunk = one ranking batch, so every batch holds the same users as in one process and the per-user results are
bitwise the same), and :func:`gather` puts the blocks back in order on the main process.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["barrier", "broadcast", "gather", "gather_arrays", "init", "is_main", "main_first", "rank", "shard",
           "world_size"]


def world_size() -> int:
    """Processes in this job (``WORLD_SIZE`` set by the launcher; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    """This process's index, 0..world_size()-1 (0 is the main process that writes files)."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def init(timeout_s: float = 1800.0) -> bool:
    """Join the launcher's process group if there is one (idempotent); True when running distributed."""
    if world_size() <= 1:
        return False
    import torch

    dist = _dist()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        # leave the group before the interpreter exits: a gloo group left to the C++ destructors at exit can
        # abort the process ("terminate called without an active exception") after its work is done
        atexit.register(_leave_group)
        log.info("rank %d of %d joined the process group (%s)", rank(), world_size(), dist.get_backend())
    return True


def _leave_group() -> None:
    dist = _dist()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            log.debug("destroy_process_group failed at exit", exc_info=True)


def barrier() -> None:
    """Wait until every process got here (no-op with one process)."""
    if init():
        _dist().barrier()


def broadcast(obj: T) -> T:
    """The main process's ``obj`` on every process (picklable objects)."""
    if not init():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: T, everyone: bool = False) -> list[T] | None:
    """Every process's ``obj`` in rank order: on the main process (on all with ``everyone``); None elsewhere."""
    if not init():
        return [obj]
    dist = _dist()
    if everyone:
        out: list[Any] = [None] * world_size()
        dist.all_gather_object(out, obj)
        return out
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def gather_arrays(local: dict[str, Any], everyone: bool = False) -> dict[str, Any] | None:
    """Concatenate each array of ``local`` over processes in rank order (ints are summed; None stays None).

    Pairs with :func:`shard`: rank r's block follows rank r-1's, so the result is in the original user order.
    """
    parts = gather(local, everyone)
    if parts is None:
        return None
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for key, first in parts[0].items():
        if first is None:
            out[key] = None
        elif isinstance(first, np.ndarray):
            out[key] = np.concatenate([p[key] for p in parts])
        elif isinstance(first, (int, float)):
            out[key] = sum(p[key] for p in parts)
        else:
            raise TypeError(f"gather_arrays: {key!r} is a {type(first).__name__}, not an array or number")
    return out


def shard(n: int, chunk: int = 1) -> np.ndarray:
    """The indices 0..n-1 that this process takes: a contiguous block of whole ``chunk``-sized pieces.

    Blocks follow rank order and differ in size by at most one chunk; with one process, all of 0..n-1.
    """
    w = world_size()
    if w <= 1:
        return np.arange(n)
    chunk = max(1, int(chunk))
    n_chunks = -(-n // chunk)
    per, extra = divmod(n_chunks, w)
    r = rank()
    first = r * per + min(r, extra)
    last = first + per + (1 if r < extra else 0)
    return np.arange(min(first * chunk, n), min(last * chunk, n))


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (e.g. writes files), then the others run it (e.g. read them)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
