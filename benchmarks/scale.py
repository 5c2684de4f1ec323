"""How palr's cost grows with the data: loading, one SASRec epoch, full-ranking evaluation.

    python benchmarks/scale.py --sizes 1000000,10000000 --out /tmp/scale [--sasrec-sizes 1000000] [--eval-users 2000]

For each size N (interactions) a synthetic CSV ``user,item,timestamp`` is written once (N/50 users, N/100
items, Zipf-like item popularity, so 5-core keeps nearly everything), then, each in a fresh process so the
peak memory (max RSS) is that step's alone:

* ``load``: ``palr data stats --dataset csv:FILE --json`` (read, dedupe, 5-core, time sort, id maps), wall time
  and peak memory of the whole command;
* ``sasrec``: one SASRec epoch on the training split (hidden 64, 2 blocks, max length 50, batch 256, full
  softmax, no validation), seconds and seconds per 1M training interactions;
* ``evaluate``: full ranking (every item, history excluded, seeded ties) of ``--eval-users`` test users by
  popularity and by a SASRec of the same shape (trained one epoch on 1,000 users: the cost of scoring does
  not depend on the weights): users per second.

Prints one JSON object per step (wall seconds, CPU seconds of the process and its threads, peak memory) and all
rows at the end. On a shared machine the CPU seconds say more than the wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from palr.data.dataset import Split

HERE = Path(__file__).resolve()


def write_csv(path: Path, n: int, seed: int = 0) -> Path:
    """N interactions of N/50 users over N/100 items (Zipf-like popularity), integer timestamps with ties."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    n_users, n_items = max(n // 50, 10), max(n // 100, 10)
    users = rng.integers(0, n_users, n)
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items = rng.choice(n_items, size=n, p=weights / weights.sum())
    times = 1_000_000_000 + rng.integers(0, 3_000_000, n)
    table = pa.table({"user": pa.array(users).cast(pa.string()), "item": pa.array(items + 1).cast(pa.string()),
                      "timestamp": pa.array(times)})
    tmp = path.with_suffix(".tmp")
    pacsv.write_csv(table, tmp, pacsv.WriteOptions(quoting_style="none"))
    tmp.replace(path)
    return path


def run_measured(cmd: list[str], log: Path) -> dict[str, float | str]:
    """Run ``cmd`` (stderr to ``log``); its wall seconds, peak RSS in GiB (from wait4) and stdout."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, open(log, "a") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return {"seconds": round(seconds, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_gib": round(usage.ru_maxrss / 2**20, 3), "stdout": text}


def step(kind: str, csv_path: Path, eval_users: int) -> dict[str, float]:
    """One measured step inside a fresh process (``kind``: sasrec or evaluate); prints JSON."""
    import resource

    from palr.data import load_split
    from palr.evaluate.retrievers import evaluate_retriever
    from palr.retrieval.base import make_retriever

    split = load_split(f"csv:{csv_path}")
    n_train = int(sum(len(s) for s in split.train))
    # the timed epoch uses the default full softmax; the evaluation's model is trained with the sampled softmax,
    # whose memory does not grow with the catalogue (a full softmax over 100,000 items at batch 256 needs > 10 GB)
    sasrec = make_retriever("sasrec", hidden=64, heads=1, layers=2, max_len=50, batch_size=256, epochs=1,
                            patience=1, dropout=0.2, bf16=False, seed=0, loss="ce" if kind == "sasrec" else "sampled")
    # the evaluation's SASRec is trained on a few users only (scoring cost does not depend on the weights)
    train = split.train if kind == "sasrec" else split.train[:1000]
    t0, c0 = time.perf_counter(), time.process_time()
    sasrec.fit(train, split.n_items, valid=None)
    fit_s, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    out: dict[str, float] = {"train_interactions": n_train, "users": split.dataset.n_users, "items": split.n_items}
    if kind == "sasrec":
        out.update(epoch_s=round(fit_s, 2), epoch_s_per_1m=round(fit_s / (n_train / 1e6), 2),
                   epoch_cpu_s=round(fit_cpu, 2), epoch_cpu_s_per_1m=round(fit_cpu / (n_train / 1e6), 2))
    else:
        users = min(eval_users, split.dataset.n_users)
        head = _head_split(split, users)
        for name, model in (("popularity", make_retriever("popularity").fit(split.train, split.n_items)),
                            ("sasrec", sasrec)):
            c0 = time.process_time()
            r = evaluate_retriever(model, head, "test", batch_size=256)
            out[f"{name}_users_per_s"] = round(users / r["seconds"], 1)
            out[f"{name}_users_per_cpu_s"] = round(users / (time.process_time() - c0), 1)
    out["peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return out


def _head_split(split: Split, users: int) -> Split:
    """The first ``users`` users of ``split`` (their full histories): evaluation cost per user is unchanged."""
    ds = split.dataset
    head = replace(ds, user_ids=ds.user_ids[:users], sequences=ds.sequences[:users],
                   user_attributes=ds.user_attributes[:users] if ds.user_attributes else None)
    return Split.leave_one_out(head)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--sasrec-sizes", default="1000000", help="sizes at which to time a SASRec epoch")
    ap.add_argument("--eval-sizes", default="1000000,10000000", help="sizes at which to time evaluation")
    ap.add_argument("--eval-users", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/palr-scale"))
    ap.add_argument("--step", choices=("sasrec", "evaluate"), help=argparse.SUPPRESS)
    ap.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        print(json.dumps(step(args.step, args.csv, args.eval_users)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        csv_path = write_csv(args.out / f"inter_{n}.csv", n)
        log = args.out / "scale.log"
        load = run_measured([sys.executable, "-c", "from palr.cli import main; main()", "data", "stats",
                             "--dataset", f"csv:{csv_path}", "--json"], log)
        stats = json.loads(str(load.pop("stdout")))
        row = {"interactions": n, "after_5core": stats["interactions"], "users": stats["users"],
               "items": stats["items"], "load_s": load["seconds"], "load_cpu_s": load["cpu_s"],
               "load_gib": load["peak_gib"]}
        print(json.dumps(row), flush=True)
        for kind, at in (("sasrec", args.sasrec_sizes), ("evaluate", args.eval_sizes)):
            if str(n) in at.split(","):
                r = run_measured([sys.executable, str(HERE), "--step", kind, "--csv", str(csv_path),
                                  "--eval-users", str(args.eval_users)], log)
                res = json.loads(str(r.pop("stdout")).strip().splitlines()[-1])
                row.update({f"{kind}_{k}": v for k, v in res.items()})
                print(json.dumps({kind: res, "wall_s": r["seconds"]}), flush=True)
        rows.append(row)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
