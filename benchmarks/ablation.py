"""Ablation of the PALR ranker over one SASRec run: SASRec, the feature re-ranker, the LLM ranker alone, the full
PALR ranker (LLM fused with the feature ranker), and PALR with each change switched off.

    python benchmarks/ablation.py --retriever-run RUN --out DIR [--seed 0] [--variants full,prefixes,...]

Every model is scored on the same test users (all of them unless --users), end to end (a target outside the
retriever's top-50 is a miss); per-user NDCG@10/HR@10 give paired-bootstrap 95% CIs
(``palr.evaluate.stats.paired_bootstrap``) of the ratio to SASRec and of PALR to the feature ranker. Variants:
  default        palr finetune's defaults
  full           genuine validation candidates, hybrid ID+text item tokens, profiles, fused with the feature
                 ranker (also scored with the fusion off: "LLM ranker alone"; the RESULTS.md tables of issue 11)
  prefixes       training-prefix candidates instead of genuine ones (the old data)
  both           genuine + prefix candidates
  retriever_init item tokens from SASRec's ID embeddings only (no text)
  no_profiles    no profile in the prompt
  old            all of the above off: prefixes, ID init, no feature ranker (the PALR before issue 11)
  dim128, layers4, hist50   the embedded model wider, deeper, or with 50 history items in the prompt
Writes DIR/ablation.json (figures, CIs, seconds to fine-tune, ms per user to rank) and prints markdown rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from palr.core.metrics import per_user_metrics
from palr.evaluate.palr import evaluate_palr
from palr.evaluate.stats import paired_bootstrap
from palr.rank.pipeline import PALR
from palr.rank.trees import FeatureRankerConfig
from palr.train.examples import ExampleConfig
from palr.train.finetune import finetune
from palr.train.lm import FinetuneConfig
from palr.train.trees import train_feature_run

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},  # the current defaults (chosen on held-out validation users)
    "full": {"source": "valid", "item_init": "hybrid"},
    # each of these switches one thing of "full" off
    "prefixes": {"source": "prefixes", "item_init": "hybrid"},
    "both": {"source": "both", "item_init": "hybrid"},
    "retriever_init": {"source": "valid", "item_init": "retriever"},
    "no_profiles": {"source": "valid", "item_init": "hybrid", "profiles": False},
    "old": {"source": "prefixes", "item_init": "retriever", "feature_ranker": False},
    # sizing of the embedded model (chosen on held-out validation users, see metrics.json)
    "dim128": {"mini": {"dim": 128}},
    "layers4": {"mini": {"layers": 4}},
    "hist50": {"history_len": 50},
}
EXAMPLE_KEYS = {"source", "history_len"}


def config_for(variant: str, seed: int) -> FinetuneConfig:
    from palr.core.settings import MiniConfig

    opts = dict(VARIANTS[variant])
    ex = ExampleConfig(seed=seed, **{k: v for k, v in opts.items() if k in EXAMPLE_KEYS})
    if "mini" in opts:
        opts["mini"] = MiniConfig(**opts["mini"])
    return FinetuneConfig(seed=seed, examples=ex, **{k: v for k, v in opts.items() if k not in EXAMPLE_KEYS})


def scored(palr: PALR, users: np.ndarray | None) -> dict[str, Any]:
    ev = evaluate_palr(palr, "test", progress=False, users=users)
    name = next(k for k in ev["ranks"] if k.endswith("(retriever)"))
    return {"ranks": ev["ranks"]["PALR (end to end)"]["test"], "retriever_ranks": ev["ranks"][name]["test"],
            "ms_per_user": ev["timings"]["ranking_ms_per_user_median"]}


def row(name: str, ranks: np.ndarray, base: np.ndarray, seconds: float | None, ms: float | None,
        ref: np.ndarray | None = None) -> dict[str, Any]:
    m, b = per_user_metrics(ranks, (10,)), per_user_metrics(base, (10,))
    c = paired_bootstrap(m["NDCG@10"], b["NDCG@10"])
    out = {"model": name, "NDCG@10": float(m["NDCG@10"].mean()), "HR@10": float(m["HR@10"].mean()),
           "ratio": c.ratio, "ratio_ci95": list(c.ratio_ci95), "p_value": c.p_value, "finetune_s": seconds,
           "ms_per_user": ms}
    if ref is not None:
        r = paired_bootstrap(m["NDCG@10"], per_user_metrics(ref, (10,))["NDCG@10"])
        out["vs_features"] = {"ratio": r.ratio, "ratio_ci95": list(r.ratio_ci95), "p_value": r.p_value}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--retriever-run", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="full")
    ap.add_argument("--users", type=int, default=0, help="a seeded sample of test users (0 = all)")
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"retriever_run": str(args.retriever_run), "seed": args.seed, "rows": [], "runs": {}}
    t0 = time.perf_counter()
    frun = args.out / "features"
    if not (frun / "run.json").exists():
        train_feature_run(args.retriever_run, frun, FeatureRankerConfig(seed=args.seed), data_dir=args.data_dir)
    f_s = json.loads((frun / "metrics.json").read_text())["valid"]["total_seconds"]
    fp = PALR.load(frun, args.data_dir)
    users = None
    if args.users:
        n = fp.split.dataset.n_users
        users = np.sort(np.random.default_rng(args.seed).choice(n, min(args.users, n), replace=False))
    f = scored(fp, users)
    base = f["retriever_ranks"]
    doc["rows"].append(row("SASRec (retriever)", base, base, None, None))
    doc["rows"].append(row("feature re-ranker (LightGBM)", f["ranks"], base, f_s, f["ms_per_user"]))
    for v in [x.strip() for x in args.variants.split(",") if x.strip()]:
        prun = args.out / f"palr-{v}"
        if not (prun / "run.json").exists():
            finetune(args.retriever_run, prun, config_for(v, args.seed), data_dir=args.data_dir, progress=False)
        meta = json.loads((prun / "metrics.json").read_text())
        doc["runs"][v] = {"valid": meta["valid"], "seconds": meta["seconds"]}
        alone = scored(PALR.load(prun, args.data_dir, features=False), users)
        doc["rows"].append(row(f"{v}: LLM ranker alone (fused with SASRec's rank)", alone["ranks"], base,
                               meta["seconds"], alone["ms_per_user"], f["ranks"]))
        if json.loads((prun / "ranking.json").read_text()).get("features"):
            full = scored(PALR.load(prun, args.data_dir), users)
            doc["rows"].append(row(f"{v}: PALR ranker (LLM + feature ranker)", full["ranks"], base, meta["seconds"],
                                   full["ms_per_user"], f["ranks"]))
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "ablation.json").write_text(json.dumps(doc, indent=1, default=float))
    for r in doc["rows"]:
        vs = r.get("vs_features")
        vs_s = f"{vs['ratio']:.3f} [{vs['ratio_ci95'][0]:.3f}, {vs['ratio_ci95'][1]:.3f}]" if vs else ""
        print(f"| {r['model']} | {r['NDCG@10']:.4f} | {r['HR@10']:.4f} | {r['ratio']:.3f} "
              f"[{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}] | {vs_s} | "
              f"{'' if r['finetune_s'] is None else round(r['finetune_s'])} | "
              f"{'' if r['ms_per_user'] is None else r['ms_per_user']} |")


if __name__ == "__main__":
    main()
