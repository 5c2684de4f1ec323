"""Score a predictions file independently of palr's metric code, and check it against results.json.

    python benchmarks/score_predictions.py --dataset ml-100k predictions.jsonl [--results results.json --model NAME]

A predictions file has one JSON line per user, ``{"user": ID, "items": [ID, ...]}``, best first. The targets
are the last interaction of each user after palr's preprocessing (the test split; ``--stage valid`` for the
second-to-last), taken from palr's data loader; everything else here is plain Python: HR@k = target in the
first k items, NDCG@k = 1 / log2(position + 1), MRR@k = 1 / position. With ``--results`` it exits 1 unless the
figures agree with results.json to 4 decimals.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

KS = (5, 10, 20)


def score_file(predictions: Path, targets: dict[str, str], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """{"HR@k", "NDCG@k", "MRR@k": mean over the users in the file, "users": count} (plain Python)."""
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("HR", "NDCG", "MRR")}
    users = 0
    with open(predictions, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            target = targets[str(rec["user"])]
            items = [str(i) for i in rec["items"]]
            users += 1
            if target not in items:
                continue
            pos = items.index(target) + 1
            for k in ks:
                if pos <= k:
                    sums[f"HR@{k}"] += 1.0
                    sums[f"NDCG@{k}"] += 1.0 / math.log2(pos + 1)
                    sums[f"MRR@{k}"] += 1.0 / pos
    out: dict[str, float] = {m: s / users for m, s in sums.items()}
    out["users"] = users
    return out


def targets_of(dataset: str, data_dir: str | None = None, stage: str = "test") -> dict[str, str]:
    """{user id: target item id} from palr's preprocessing of ``dataset``."""
    from palr.data import load_dataset

    ds = load_dataset(dataset, data_dir)
    pos = -1 if stage == "test" else -2
    return {u: ds.catalog.item_ids[int(seq[pos])] for u, seq in zip(ds.user_ids, ds.sequences)}


def check(scored: dict[str, float], results: dict, model: str, stage: str = "test", places: int = 4) -> list[str]:
    """Differences (as lines) between the scored figures and results.json's for ``model``; empty if none."""
    want = results["results"][model][stage]
    bad = []
    for m, v in scored.items():
        if m in want and round(float(want[m]), places) != round(v, places):
            bad.append(f"{m}: file {v:.6f}, results.json {float(want[m]):.6f}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions", type=Path)
    ap.add_argument("--dataset", "-d", required=True)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--stage", default="test", choices=("test", "valid"))
    ap.add_argument("--results", type=Path, help="results.json to check against (to 4 decimals)")
    ap.add_argument("--model", help="the model in results.json (default: the first; PALR runs: PALR (end to end))")
    args = ap.parse_args(argv)
    scored = score_file(args.predictions, targets_of(args.dataset, args.data_dir, args.stage))
    print(json.dumps(scored, indent=2))
    if args.results is None:
        return 0
    results = json.loads(args.results.read_text())
    model = args.model or ("PALR (end to end)" if "PALR (end to end)" in results["results"] else next(iter(results["results"])))
    bad = check(scored, results, model, args.stage)
    for line in bad:
        print(f"MISMATCH {model} {line}", file=sys.stderr)
    print(f"{model}: {'agrees with' if not bad else 'DISAGREES with'} {args.results} to 4 decimals")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
