"""How wide is a paired-bootstrap interval near a ratio of 1? Two close models (item-kNN with 50 vs 100
neighbours) on the same test users, test NDCG@10, per data set.

    python benchmarks/ci_width.py --data-dir /work/shared/data [--datasets ml-latest-small amazon-beauty]
"""

from __future__ import annotations

import argparse
import json

from palr.data import load_split
from palr.evaluate.retrievers import evaluate_retriever
from palr.evaluate.tables import compare_ranks
from palr.train.retriever import fit_retriever


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--datasets", nargs="+", default=["ml-latest-small", "amazon-beauty"])
    args = ap.parse_args(argv)
    print("| data set | test users | NDCG@10 (50 vs 100 neighbours) | ratio [95% CI] | p |\n|---|---:|---|---:|---:|")
    for name in args.datasets:
        split = load_split(name, args.data_dir)
        ranks = {}
        for label, params in (("itemknn-100", {}), ("itemknn-50", {"neighbours": 50})):
            model, _ = fit_retriever("itemknn", split, params)
            ranks[label] = {"test": evaluate_retriever(model, split, "test", ks=(10,))["ranks"]}
        c = compare_ranks(ranks, [("itemknn-50", "itemknn-100")], (10,))["itemknn-50 vs itemknn-100"]["test"]["NDCG@10"]
        print(f"| {name} | {c['n_users']:,} | {c['mean_a']:.5f} vs {c['mean_b']:.5f} | {c['ratio']:.3f} "
              f"[{c['ratio_ci95'][0]:.3f}, {c['ratio_ci95'][1]:.3f}] | {c['p_value']:.2g} |", flush=True)
        print(json.dumps(c))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
