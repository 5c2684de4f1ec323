"""PALR with the embedded model vs the SASRec it re-ranks, measured in one run per data set.

    python benchmarks/palr_e2e.py --data-dir ../shared/data [--datasets ml-latest-small,amazon-beauty]

For each data set: train SASRec (palr train), fine-tune the embedded mini LLM on its top-50 (palr
finetune), evaluate on the test split (full ranking; a retrieval miss is a miss): SASRec alone, PALR
end to end, PALR on users whose target was retrieved; verbalizer latency per user; generative mode on a
seeded sample of users beside the verbalizer on the same users. Writes the "## PALR" section of
benchmarks/RESULTS.md and a JSON file per data set under --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no busy-waiting threads

HERE = Path(__file__).resolve().parent
FT = {  # fine-tuning settings per data set (flags of `palr finetune`)
    "ml-100k": {"epochs": 3.0, "positions": 10},
    "ml-latest-small": {"epochs": 3.0, "positions": 60},
    "amazon-beauty": {"epochs": 2.0, "positions": 3},
}


def run(dataset: str, data_dir: str, out: Path, gen_users: int, seed: int) -> dict:
    from palr.evaluate.palr import evaluate_palr
    from palr.rank.pipeline import PALR
    from palr.train.examples import ExampleConfig
    from palr.train.finetune import finetune
    from palr.train.lm import FinetuneConfig
    from palr.train.retriever import train_run

    rrun = out / f"{dataset}-sasrec"
    if not (rrun / "run.json").exists():  # an existing SASRec run of the same data is reused (its fit time is kept)
        train_run(dataset, "sasrec", rrun, seed=seed, data_dir=data_dir, progress=False)
    t_retr = json.loads((rrun / "metrics.json").read_text())["timings"]["fit_s"]
    ft = FT.get(dataset, {"epochs": 3.0, "positions": 10})
    cfg = FinetuneConfig(epochs=ft["epochs"], seed=seed,
                         examples=ExampleConfig(positions_per_user=int(ft["positions"]), seed=seed))
    t1 = time.perf_counter()
    prun = finetune(rrun, out / f"{dataset}-palr", cfg, data_dir=data_dir, progress=False)
    t_ft = time.perf_counter() - t1
    t2 = time.perf_counter()
    palr = PALR.load(prun, data_dir)
    ev = evaluate_palr(palr, "test", progress=False)
    t_eval = time.perf_counter() - t2
    sample = np.sort(np.random.default_rng(seed).choice(palr.split.dataset.n_users,
                                                       min(gen_users, palr.split.dataset.n_users), replace=False))
    verb_s = evaluate_palr(palr, "test", progress=False, users=sample, latency_users=50)
    gen = PALR.load(prun, data_dir, mode="generative")
    gen_s = evaluate_palr(gen, "test", progress=False, users=sample, latency_users=50)
    doc = {"dataset": dataset, "results": ev["results"], "comparisons": ev["comparisons"], "timings": ev["timings"],
           "sample": {"users": len(sample), "verbalizer": verb_s["results"], "generative": gen_s["results"],
                      "verbalizer_timings": verb_s["timings"], "generative_timings": gen_s["timings"],
                      "invalid_generations": gen_s["invalid_generations"]},
           "valid": json.loads((prun / "metrics.json").read_text())["valid"],
           "seconds": {"retriever_train": round(t_retr, 1), "finetune": round(t_ft, 1), "evaluate": round(t_eval, 1),
                       "total": round(t_retr + time.perf_counter() - t1, 1)}}
    (out / f"{dataset}.json").write_text(json.dumps(doc, indent=2))
    return doc


CI_NOTE = "paired-bootstrap 95% CI over users (2,000 resamples) and a paired t-test p-value"


def section(docs: list[dict], command: str) -> str:
    lines = ["## PALR (embedded mini model) vs the SASRec it re-ranks", "",
             f"Command: `{command}`  ",
             (f"Date: {dt.date.today().isoformat()}; machine: {platform.machine()} CPU, 2 cores, no GPU; "
              f"Python {platform.python_version()}.  "),
             ("Protocol: test split, leave-one-out, full ranking over all items with the history excluded, "
              "ties in a seeded random order; PALR re-ranks SASRec's top-50; a target SASRec did not retrieve counts "
              "as a miss (end to end); the fusion kind and weight were chosen on validation users only. "
              f"Ratio: NDCG@10 over SASRec's on the same users, with its {CI_NOTE}."), "",
             "| data set | model | HR@10 | NDCG@10 | MRR@10 | users | NDCG@10 ratio vs SASRec [95% CI] | p |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for d in docs:
        vs = {c["model"]: c["test"]["NDCG@10"] for c in d["comparisons"].values()}
        for name, v in d["results"].items():
            m = v["test"]
            c = vs.get(name)
            cells = (f"{c['ratio']:.3f} [{c['ratio_ci95'][0]:.3f}, {c['ratio_ci95'][1]:.3f}] | {c['p_value']:.2g}"
                     if c and c["ratio"] is not None else "1 (baseline) | ")
            lines.append(f"| {d['dataset']} | {name} | {m['HR@10']:.4f} | {m['NDCG@10']:.4f} | {m['MRR@10']:.4f} | "
                         f"{m['users']} | {cells} |")
    lines += ["", "Time and latency (seconds unless stated):", "",
              ("| data set | SASRec train | fine-tune | evaluate | total | verbalizer ms/user (median, 1 user a call) "
               "| generative ms/user (median) |"), "|---|---:|---:|---:|---:|---:|---:|"]
    for d in docs:
        s, t = d["seconds"], d["timings"]
        lines.append(f"| {d['dataset']} | {s['retriever_train']} | {s['finetune']} | {s['evaluate']} | {s['total']} | "
                     f"{t['ranking_ms_per_user_median']} | {d['sample']['generative_timings']['ranking_ms_per_user_median']} |")
    lines += ["", "Verbalizer vs generative (constrained decoding over the candidates) on the same seeded sample:", "",
              "| data set | users | SASRec NDCG@10 | verbalizer NDCG@10 | generative NDCG@10 | invalid generated tokens |",
              "|---|---:|---:|---:|---:|---:|"]
    for d in docs:
        smp = d["sample"]
        sb = next(v["test"] for k, v in smp["verbalizer"].items() if k.endswith("(retriever)"))
        lines.append(f"| {d['dataset']} | {smp['users']} | {sb['NDCG@10']:.4f} | "
                     f"{smp['verbalizer']['PALR (end to end)']['test']['NDCG@10']:.4f} | "
                     f"{smp['generative']['PALR (end to end)']['test']['NDCG@10']:.4f} | {smp['invalid_generations']} |")
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = HERE / "RESULTS.md") -> None:
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    title = text.splitlines()[0]
    pat = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    new = pat.sub(text + "\n", old) if pat.search(old) else old.rstrip() + "\n\n" + text
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--datasets", default="ml-latest-small,amazon-beauty")
    ap.add_argument("--out", default="runs/bench-palr")
    ap.add_argument("--gen-users", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file whose PALR section is replaced")
    args = ap.parse_args()
    import os

    data_dir = args.data_dir or os.environ.get("PALR_DATA_DIR")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = [run(d, data_dir, out, args.gen_users, args.seed) for d in args.datasets.split(",")]
    write_section(section(docs, "python benchmarks/palr_e2e.py " + " ".join(sys.argv[1:])), Path(args.results))
    print(section(docs, ""))


if __name__ == "__main__":
    main()
