"""SASRec hyper-parameter sweep that records whole validation curves (used to choose palr's defaults).

Every configuration trains for a fixed number of epochs and is validated after every epoch on the full
validation split, scored separately on two fixed random halves of the users (A and B). Early-stopping
rules are then compared offline on these curves (``--analyse``): pick the epoch on half A, read its value
on half B (and the reverse), so the choice of rule is not flattered by the noise it selects on. Test is
never touched.

    python benchmarks/sasrec_sweep.py --out sweep.jsonl --workers 8 --budget 360    # runs (a GPU helps)
    python benchmarks/sasrec_sweep.py --analyse sweep.jsonl                          # tables

The two sweeps behind palr's defaults (2026-11-27, one H200, 12 worker processes) are kept in
benchmarks/sweeps/ (``--phase 1``: amazon-beauty; ``--phase 2``: ml-100k and ml-latest-small).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("ml-100k", "ml-latest-small", "amazon-beauty")
SPLITS: dict[str, Any] = {}


def grid(phase: int, smoke: bool = False) -> list[dict[str, Any]]:
    """The configurations, longest jobs first. Phase 1: amazon-beauty (and MovieLens, which the 2026-11-27
    GPU call did not reach); phase 2: a smaller MovieLens grid."""
    if smoke:
        return [{"dataset": "ml-100k", "hidden": 32, "heads": 1, "dropout": 0.2, "batch_size": 256, "lr": 2e-3,
                 "max_len": 50, "epochs": 2, "seed": 0}]
    if phase == 2:
        ml = [{"dataset": ds, "hidden": 64, "heads": 1, "dropout": d, "batch_size": b, "lr": lr, "max_len": 200,
               "epochs": 150, "seed": 0}
              for lr, b, d, ds in itertools.product((1e-3, 2e-3, 4e-3), (64, 128, 256), (0.2, 0.3, 0.5),
                                                    ("ml-100k", "ml-latest-small"))
              if (b, lr) not in ((64, 4e-3), (256, 1e-3))]
        ml += [{"dataset": ds, "hidden": 128, "heads": 2, "dropout": d, "batch_size": 128, "lr": 2e-3,
                "max_len": 200, "epochs": 150, "seed": 0}
               for d, ds in itertools.product((0.2, 0.3), ("ml-100k", "ml-latest-small"))]
        return ml
    beauty = [{"dataset": "amazon-beauty", "hidden": h, "heads": max(1, h // 64), "dropout": d, "batch_size": b,
               "lr": lr, "max_len": 50, "epochs": 60, "seed": 0}
              for h, d, b, lr in itertools.product((64, 128, 256), (0.2, 0.3, 0.5), (128, 256), (1e-3,))]
    beauty += [{"dataset": "amazon-beauty", "hidden": h, "heads": max(1, h // 64), "dropout": d, "batch_size": 512,
                "lr": 2e-3, "max_len": 50, "epochs": 60, "seed": 0} for h, d in itertools.product((128, 256),
                                                                                                  (0.3, 0.5))]
    beauty += [{"dataset": "amazon-beauty", "hidden": 128, "heads": 2, "dropout": 0.5, "batch_size": 128,
                "lr": 1e-3, "max_len": 50, "epochs": 60, "seed": 0, "loss": "sampled", "negatives": n}
               for n in (256, 1024)]
    ml = [{"dataset": ds, "hidden": 64, "heads": 1, "dropout": d, "batch_size": b, "lr": lr, "max_len": 200,
           "epochs": 150, "seed": 0}
          for ds, b, d, lr in itertools.product(("ml-100k", "ml-latest-small"), (64, 128, 256), (0.1, 0.2, 0.3, 0.5),
                                                (1e-3, 2e-3, 4e-3))]
    return beauty + ml


def run_one(job: tuple[int, dict[str, Any], str, float]) -> str:
    import torch

    from palr.retrieval.sasrec import SASRec, validation_ranks

    jid, cfg, out, deadline = job
    if time.time() > deadline - 20:
        return f"{jid} skipped"
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = True
    split = SPLITS[cfg["dataset"]]
    hist, tgt = split.histories("valid"), split.targets("valid")
    half = np.random.default_rng(12345).permutation(len(tgt)) < len(tgt) // 2  # fixed halves A (True) / B
    params = {k: v for k, v in cfg.items() if k != "dataset"}
    model = SASRec(**params, patience=10**6, eval_every=1, eval_users=1)  # the library's own check: 1 user
    t0 = time.time()

    def report(epoch: int, entry: dict[str, Any]) -> None:
        rank = validation_ranks(model.net, hist, tgt)
        gain = np.where(rank <= 10, 1.0 / np.log2(rank + 1.0), 0.0)
        line = {"job": jid, **cfg, "epoch": epoch, "train_loss": entry["loss"], "A": float(gain[half].mean()),
                "B": float(gain[~half].mean()), "all": float(gain.mean()), "HR": float((rank <= 10).mean()),
                "s": round(time.time() - t0, 2)}
        with open(out, "a") as fh:
            fh.write(json.dumps(line) + "\n")
        if time.time() > deadline:
            raise TimeoutError

    try:
        model.fit(split.train, split.n_items, valid=(hist, tgt), report=report)
    except TimeoutError:
        return f"{jid} cut at the deadline"
    return f"{jid} done in {time.time() - t0:.0f}s"


def sweep(out: str, workers: int, budget: float, phase: int, smoke: bool) -> None:
    from palr.data import load_split

    start = time.time()
    jobs = grid(phase, smoke)
    for ds in sorted({j["dataset"] for j in jobs}):
        SPLITS[ds] = load_split(ds)
    print(f"loaded in {time.time() - start:.1f}s; {len(jobs)} jobs", flush=True)
    deadline = start + budget
    Path(out).write_text("")
    with mp.get_context("fork").Pool(workers) as pool:
        for msg in pool.imap_unordered(run_one, [(i, j, out, deadline) for i, j in enumerate(jobs)]):
            print(msg, f"t={time.time() - start:.0f}s", flush=True)


# ---------------------------------------------------------------------------- analysis
def stop_epoch(curve: np.ndarray, every: int, patience: int, smooth: float) -> int:
    """Index of the epoch whose weights an early-stopping rule keeps (curve: NDCG@10 per epoch)."""
    best, tracked, pick, waited = -1.0, None, 0, 0
    for e in range(every - 1, len(curve), every):
        tracked = curve[e] if tracked is None else smooth * tracked + (1 - smooth) * curve[e]
        if tracked > best:
            best, pick, waited = tracked, e, 0
        else:
            waited += 1
            if waited >= patience:
                break
    return pick


def analyse(path: str, rules: list[tuple[int, int, float]]) -> None:
    """Per data set and configuration: the best whole-validation NDCG@10 and, for each (every, patience,
    smooth) rule, the held-out-half NDCG@10 of the epoch it keeps and that epoch."""
    import gzip

    raw = gzip.decompress(Path(path).read_bytes()) if path.endswith(".gz") else Path(path).read_bytes()
    rows = [json.loads(x) for x in raw.decode().splitlines() if x.strip()]
    runs: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault(r["job"], []).append(r)
    keys = ("dataset", "hidden", "dropout", "batch_size", "lr", "max_len", "seed", "loss", "negatives")
    table = []
    for rs in runs.values():
        rs.sort(key=lambda r: r["epoch"])
        a, b = np.array([r["A"] for r in rs]), np.array([r["B"] for r in rs])
        allc = np.array([r["all"] for r in rs])
        res = {k: rs[0].get(k, "") for k in keys}
        res.update(epochs_run=len(rs), best_all=allc.max(), best_epoch=int(allc.argmax()) + 1)
        for every, pat, sm in rules:
            ea, eb = stop_epoch(a, every, pat, sm), stop_epoch(b, every, pat, sm)
            res[f"{every}/{pat}/{sm}"] = ((b[ea] + a[eb]) / 2, (ea + eb) / 2 + 1)
        table.append(res)
    for ds in DATASETS:
        sub = [t for t in table if t["dataset"] == ds]
        if not sub:
            continue
        print(f"\n## {ds}: {len(sub)} runs; held-out-half NDCG@10 of the epoch each rule keeps (epoch)")
        cols = [f"{e}/{p}/{s}" for e, p, s in rules]
        print(" ".join(f"{k:>9}" for k in ("hid", "drop", "batch", "lr", "len", "seed", "loss", "eps", "best@ep"))
              + " " + " ".join(f"{c:>14}" for c in cols))
        for t in sorted(sub, key=lambda t: -t[cols[0]][0]):
            print(" ".join(f"{t[k]!s:>9}" for k in ("hidden", "dropout", "batch_size", "lr", "max_len", "seed",
                                                          "loss", "epochs_run"))
                  + f" {t['best_all']:.4f}@{t['best_epoch']:<3}"
                  + " " + " ".join(f"{t[c][0]:.4f} ({t[c][1]:5.1f})" for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="sweep.jsonl")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--budget", type=float, default=360.0, help="Seconds; no epoch starts after it.")
    ap.add_argument("--phase", type=int, default=2, choices=(1, 2), help="Which grid (see grid()).")
    ap.add_argument("--smoke", action="store_true", help="One tiny configuration (a check of the script).")
    ap.add_argument("--analyse", metavar="JSONL", help="Compare early-stopping rules on a finished sweep.")
    a = ap.parse_args()
    if a.analyse:
        analyse(a.analyse, [(1, 8, 0.5), (1, 5, 0.5), (1, 5, 0.0), (1, 10, 0.0), (1, 20, 0.0), (2, 5, 0.5), (5, 4, 0.0)])
    else:
        sweep(a.out, a.workers, a.budget, a.phase, a.smoke)


if __name__ == "__main__":
    main()
