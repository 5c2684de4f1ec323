"""Benchmark every retriever on ml-100k, ml-latest-small and amazon-beauty in one run.

Each model is trained as a fresh run (``palr train``'s code path: fit on train, early stopping on
valid only, saved to disk), reloaded from disk and evaluated on test with full ranking (``palr evaluate
--run``'s code path). The table goes into benchmarks/RESULTS.md under ``## Retrieval`` (only that
section is replaced) and to stdout.

    python benchmarks/retrieval.py --data-dir /work/shared/data
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no busy-waiting threads
HERE = Path(__file__).resolve().parent
# benchmarks/palr.py would shadow the palr package when this file is run as a script
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

from palr.evaluate.stats import format_ratio, paired_bootstrap
from palr.evaluate.tables import read_per_user
from palr.retrieval.load import load_run
from palr.train.retriever import evaluate_models, train_run

DATASETS = ["ml-100k", "ml-latest-small", "amazon-beauty"]
RETRIEVERS = ["popularity", "itemknn", "als", "bpr", "text", "sasrec"]
BASELINE = "sasrec"  # the default retriever: every other model's ratio is over it
log = logging.getLogger("benchmarks.retrieval")


def run_one(dataset: str, retriever: str, runs_dir: Path, data_dir: str | None, seed: int) -> dict[str, Any]:
    """Train a fresh run, reload it, evaluate on test; returns the row for the table."""
    run_dir = runs_dir / dataset / retriever
    t0 = time.perf_counter()
    train_run(dataset, retriever, run_dir, seed=seed, data_dir=data_dir, progress=False)
    train_s = time.perf_counter() - t0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg, model, split = load_run(run_dir, data_dir)
    t1 = time.perf_counter()
    doc = evaluate_models({retriever: model}, split, candidates=50, progress=False, per_user=run_dir / "per_user.csv")
    eval_s = time.perf_counter() - t1
    test = doc["results"][retriever]["test"]
    row = {"dataset": dataset, "users": split.dataset.n_users, "items": split.n_items, "model": retriever,
           "HR@10": test["HR@10"], "NDCG@10": test["NDCG@10"], "Recall@50": test["Recall@50"],
           "valid NDCG@10": metrics["valid"]["NDCG@10"], "fit_s": metrics["timings"]["fit_s"],
           "train_s": train_s, "eval_s": eval_s, "params": cfg["config"]["params"],
           "per_user": read_per_user(run_dir / "per_user.csv")[1]["NDCG@10"]}
    if metrics.get("history"):
        row["epochs"] = len(metrics["history"])
    log.info("%s", json.dumps({k: v for k, v in row.items() if k not in ("params", "per_user")}))
    return row


def vs_baseline(rows: list[dict[str, Any]], baseline: str | None = None) -> dict[int, str]:
    """Row index -> "ratio [95% CI] | p" of its test NDCG@10 over the baseline's on the same users."""
    baseline = baseline or BASELINE
    out = {}
    for i, r in enumerate(rows):
        base = next((b for b in rows if b["dataset"] == r["dataset"] and b["model"] == baseline), None)
        if base is None or r is base:
            out[i] = "1 (baseline) | " if r is base else "- | -"
            continue
        c = paired_bootstrap(r["per_user"], base["per_user"])
        out[i] = f"{format_ratio(c, 2)} | {c.p_value:.2g}"
    return out


def table(rows: list[dict[str, Any]], with_ci: bool = True) -> str:
    head = ("| data set | users / items | model | HR@10 | NDCG@10 | Recall@50 | valid NDCG@10 | fit s "
            "| run s (fit + save + valid) | test eval s |" + (f" NDCG@10 vs {BASELINE} [95% CI] | p |" if with_ci else "")
            + "\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if with_ci else "") + "\n")
    vs = vs_baseline(rows) if with_ci else {}
    lines = [f"| {r['dataset']} | {r['users']:,} / {r['items']:,} | {r['model']} | {r['HR@10']:.4f} | "
             f"{r['NDCG@10']:.4f} | {r['Recall@50']:.4f} | {r['valid NDCG@10']:.4f} | {r['fit_s']:.1f} | "
             f"{r['train_s']:.1f} | {r['eval_s']:.1f} |" + (f" {vs[i]} |" if with_ci else "") for i, r in enumerate(rows)]
    return head + "\n".join(lines) + "\n"


def beats_popularity(rows: list[dict[str, Any]]) -> list[str]:
    """Rows whose test NDCG@10 is not above popularity's on the same data set."""
    pop = {r["dataset"]: r["NDCG@10"] for r in rows if r["model"] == "popularity"}
    return [f"{r['dataset']}/{r['model']}" for r in rows
            if r["model"] != "popularity" and r["dataset"] in pop and r["NDCG@10"] <= pop[r["dataset"]]]


def section(rows: list[dict[str, Any]], command: str, seconds: float) -> str:
    import torch

    params = {}
    for r in rows:
        params.setdefault(r["model"], {})[r["dataset"]] = r["params"]
    sas = {d: {k: p[k] for k in ("dropout", "max_len", "epochs", "patience", "batch_size", "lr")}
           for d, p in params.get("sasrec", {}).items()}
    epochs = {r["dataset"]: r.get("epochs") for r in rows if r["model"] == "sasrec"}
    losers = beats_popularity(rows)
    return (
        "## Retrieval\n\n"
        f"Command: `{command}`  \n"
        f"Date: {dt.date.today().isoformat()}; total {seconds / 60:.1f} min  \n"
        f"Machine: {platform.processor() or 'CPU'} AMD EPYC, 2 CPU cores shared with other jobs "
        f"(timings are noisy), no GPU; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"Python {platform.python_version()}\n\n"
        "Protocol (palr protocol v1): every interaction counts, duplicates keep the earliest, iterative 5-core, "
        "stable time sort, leave-one-out (last = test, second-to-last = validation). Every model is fitted on the "
        "train split only (validation picks SASRec's epoch), saved as a run, reloaded from disk and evaluated on "
        "**test with full ranking** over all items, the user's history excluded, equal scores in a seeded random "
        "order (the order written to predictions). Recall@50 = share of test targets in the top-50 candidate list. "
        "Seed 0, default hyper-parameters (saved in each run's config.json). "
        f"vs {BASELINE}: test NDCG@10 ratio on the same users with its paired-bootstrap 95% CI (2,000 resamples "
        "over users) and a paired t-test p-value.\n\n"
        + table(rows)
        + f"\nSASRec resolved settings: `{json.dumps(sas)}`; epochs run (early stopping on valid NDCG@10, "
        f"best weights kept): `{json.dumps(epochs)}`.  \n"
        + ("Every model beats popularity on every data set (test NDCG@10).\n" if not losers else
           f"**Not above popularity**: {', '.join(losers)}.\n")
    )


def write_section(path: Path, text: str) -> None:
    """Replace the ``## Retrieval`` section of ``path`` (up to the next ``## ``), or append it."""
    old = path.read_text() if path.exists() else "# Results\n"
    pattern = re.compile(r"^## Retrieval\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("PALR_DATA_DIR"), help="default: $PALR_DATA_DIR")
    ap.add_argument("--datasets", nargs="+", default=DATASETS)
    ap.add_argument("--retrievers", nargs="+", default=RETRIEVERS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs-dir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.runs_dir or Path(tmp)
        for dataset in args.datasets:
            for retriever in args.retrievers:
                rows.append(run_one(dataset, retriever, runs_dir, args.data_dir, args.seed))
                print(table(rows[-1:], with_ci=False).splitlines()[-1], flush=True)
    command = "python benchmarks/retrieval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = section(rows, command.strip(), time.perf_counter() - t0)
    print(text)
    if not args.no_write:
        write_section(args.results, text)
    losers = beats_popularity(rows)
    return 1 if losers else 0


if __name__ == "__main__":
    raise SystemExit(main())
