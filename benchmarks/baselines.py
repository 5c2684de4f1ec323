"""Popularity and item-kNN on ml-100k, ml-latest-small and amazon-beauty, one run, into benchmarks/RESULTS.md.

    python benchmarks/baselines.py --data-dir /work/shared/data

Replaces only the "## Baselines (popularity, item-kNN)" section of RESULTS.md; other sections are kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no busy-waiting threads

from palr.data import data_dir, load_split
from palr.evaluate.retrievers import evaluate_retriever
from palr.evaluate.tables import compare_ranks
from palr.train.retriever import fit_retriever

SECTION = "## Baselines (popularity, item-kNN)"
DATASETS = ("ml-100k", "ml-latest-small", "amazon-beauty")
MODELS = ("popularity", "itemknn")
CANDIDATES = 50
log = logging.getLogger("baselines")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = f", shared with other jobs (load average {load:.0f}: seconds are noisy)" if load > (os.cpu_count() or 1) else ""
    return f"{cpu}, {os.cpu_count()} CPU threads visible{busy}, no GPU used; Python {platform.python_version()}"


def run(datasets: tuple[str, ...], root: Path, seed: int) -> list[dict[str, Any]]:
    rows = []
    for name in datasets:
        t0 = time.perf_counter()
        split = load_split(name, root)
        load_s = time.perf_counter() - t0
        ds = split.dataset
        ranks: dict[str, dict[str, Any]] = {}
        for model_name in MODELS:
            model, fit_s = fit_retriever(model_name, split, seed=seed)
            valid = evaluate_retriever(model, split, "valid", ks=(10,))
            test = evaluate_retriever(model, split, "test", ks=(10,), candidates=CANDIDATES)
            m = test["metrics"]
            ranks[model_name] = {"test": test["ranks"]}
            rows.append({"dataset": name, "users": ds.n_users, "items": ds.n_items, "model": model_name,
                         "valid_ndcg10": valid["metrics"]["NDCG@10"], "hr10": m["HR@10"], "ndcg10": m["NDCG@10"],
                         "mrr10": m["MRR@10"], "recall50": m[f"Recall@{CANDIDATES}"], "load_s": load_s,
                         "fit_s": fit_s, "eval_s": valid["seconds"] + test["seconds"]})
            log.info("%s %s: test HR@10 %.4f NDCG@10 %.4f", name, model_name, m["HR@10"], m["NDCG@10"])
        # every model against popularity, on the same test users: paired-bootstrap CIs and a p-value
        comps = compare_ranks(ranks, [(mname, MODELS[0]) for mname in MODELS[1:]], (10,))
        for r in rows[-len(MODELS):]:
            c = next((v["test"]["NDCG@10"] for v in comps.values() if v["model"] == r["model"]), None)
            r["vs_pop"] = c
    return rows


def section(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `{command}`  ",
        f"Date: {dt.date.today().isoformat()}  ",
        f"Machine: {machine()}",
        "",
        ("Protocol (palr protocol v1): every interaction counts, duplicates keep the earliest, iterative 5-core, "
        "stable time sort (ties keep file order), leave-one-out (last = test, second-to-last = validation), "
        "models fitted on train only, **full ranking** over all items with the user's history excluded, "
        "equal scores in a seeded random order (seed 0; the order written to predictions). Test-set metrics; "
        f"Recall@{CANDIDATES} = share of test targets in the top {CANDIDATES} "
        "(the candidate list a re-ranker would get). Default hyper-parameters (item-kNN: 100 neighbours, last 20 "
        "items, decay 0.9, with item-to-next-item transitions). Seconds = fit + valid and test ranking. "
        "vs popularity: test NDCG@10 ratio with its paired-bootstrap 95% CI over users (2,000 resamples) and a "
        "paired t-test p-value."),
        "",
        (f"| data set | users / items | model | HR@10 | NDCG@10 | MRR@10 | Recall@{CANDIDATES} | valid NDCG@10 "
        "| seconds | NDCG@10 vs popularity [95% CI] | p |"),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r.get("vs_pop")
        vs = f"{c['ratio']:.2f}x [{c['ratio_ci95'][0]:.2f}, {c['ratio_ci95'][1]:.2f}] | {c['p_value']:.2g}" if c else "- | -"
        lines.append(f"| {r['dataset']} | {r['users']:,} / {r['items']:,} | {r['model']} | {r['hr10']:.4f} | "
                     f"{r['ndcg10']:.4f} | {r['mrr10']:.4f} | {r['recall50']:.4f} | {r['valid_ndcg10']:.4f} | "
                     f"{r['fit_s'] + r['eval_s']:.1f} | {vs} |")
    return "\n".join(lines) + "\n"


def replace_section(text: str, new: str) -> str:
    """Replace the baselines section (up to the next '## ' heading) or append it."""
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        return pattern.sub(lambda _: new + "\n", text, count=1).rstrip("\n") + "\n"
    head = text.rstrip("\n") + "\n\n" if text.strip() else "# Results\n\n"
    return head + new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="data directory (default: $PALR_DATA_DIR, else ~/.cache/palr/data)")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = run(tuple(args.datasets), data_dir(args.data_dir), args.seed)
    command = "python benchmarks/baselines.py" + "".join(f" {a}" for a in sys.argv[1:])
    new = section(rows, command)
    path = Path(args.results)
    # read-modify-write at the end, quickly: other benchmarks write other sections of the same file
    old = path.read_text() if path.exists() else ""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(replace_section(old, new))
    os.replace(tmp, path)
    print(new)


if __name__ == "__main__":
    main()
