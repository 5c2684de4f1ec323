"""Issue 17 (points 2, 4, 5): SASRec, trees only, the LLM alone and the full PALR ranker on one data set, every
figure rescored from the written predictions where a predictions file exists.

    python benchmarks/llm_features.py --dataset ml-100k --seeds 0 --out /tmp/llm-features [--sources itemknn:10]

Per seed, the commands (printed and run as they are):

    palr train -d DATASET -r sasrec --seed S --out OUT/sS/sasrec
    palr finetune OUT/sS/sasrec --ranker features --sources SRC --seed S --out OUT/sS/features
    palr finetune OUT/sS/sasrec --sources SRC --seed S --out OUT/sS/palr
    palr evaluate --run OUT/sS/palr --out OUT/sS/palr.json --predictions OUT/sS/p.jsonl --retriever-predictions OUT/sS/rp.jsonl
    palr evaluate --run OUT/sS/features --out OUT/sS/features.json --predictions OUT/sS/pt.jsonl
    palr compare A.jsonl B.jsonl -d DATASET --out ...   (paired bootstrap CIs, from the predictions)

Rows: SASRec (rp.jsonl), trees only (pt.jsonl), the LLM alone (results.json: no predictions file is written for
it), PALR as the run ranks by default (p.jsonl), and -- when the run's default is the stacked ranker -- its twin
without LLM features (results.json). Also: candidate recall at the candidate count, SASRec alone vs merged, the
held-out validation choice, fine-tune seconds and ranking ms per user. Writes OUT/table.md and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_predictions import score_file, targets_of


def sh(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (stdout/stderr appended to ``log``) unless its output exists; the wall seconds."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def compare(a: Path, b: Path, dataset: str, out: Path, log: Path) -> dict[str, Any]:
    if not out.exists():
        sh(["palr", "compare", str(a), str(b), "-d", dataset, "--out", str(out)], log)
    return json.loads(out.read_text())["metrics"]["NDCG@10"]


def fmt(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    lo, hi = c["ratio_ci95"]
    return f"{c['ratio']:.3f}x [{lo:.3f}, {hi:.3f}]"


def one_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    d = Path(args.out) / f"s{seed}"
    d.mkdir(parents=True, exist_ok=True)
    log = d / "log.txt"
    src = ["--sources", args.sources] if args.sources else []
    sec: dict[str, float] = {}
    if not (d / "sasrec" / "run.json").exists():
        sec["sasrec"] = sh(["palr", "train", "-d", args.dataset, "-r", "sasrec", "--seed", str(seed),
                            "--out", str(d / "sasrec")], log)
    if not (d / "features" / "run.json").exists():
        sec["features"] = sh(["palr", "finetune", str(d / "sasrec"), "--ranker", "features", *src, "--seed",
                              str(seed), "--out", str(d / "features")], log)
    if not (d / "palr" / "run.json").exists():
        sec["finetune"] = sh(["palr", "finetune", str(d / "sasrec"), *src, "--seed", str(seed), "--out",
                              str(d / "palr")], log)
    if not (d / "palr.json").exists():
        sh(["palr", "evaluate", "--run", str(d / "palr"), "--out", str(d / "palr.json"), "--predictions",
            str(d / "p.jsonl"), "--retriever-predictions", str(d / "rp.jsonl")], log)
    if not (d / "features.json").exists():
        sh(["palr", "evaluate", "--run", str(d / "features"), "--out", str(d / "features.json"), "--predictions",
            str(d / "pt.jsonl")], log)
    targets = targets_of(args.dataset, args.data_dir)
    scored = {name: score_file(d / f, targets) for name, f in
              (("sasrec", "rp.jsonl"), ("trees", "pt.jsonl"), ("palr", "p.jsonl"))}
    res = json.loads((d / "palr.json").read_text())
    fres = json.loads((d / "features.json").read_text())
    metrics = json.loads((d / "palr" / "metrics.json").read_text())
    valid = metrics["valid"]
    comp = res["comparisons"]
    retr = next(k for k in res["results"] if k.endswith("(retriever)"))
    twin_key = next((k for k in comp if k.endswith("vs same ranker without LLM features")), None)
    unused = "stacked ranker with LLM features (not chosen on held-out users)"
    unused_key = f"{unused} vs {retr}"
    llm_key = next((k for k in comp if k.startswith("LLM alone")), None)
    out = {
        "seed": seed,
        "ndcg@10": {"sasrec": scored["sasrec"]["NDCG@10"], "trees": scored["trees"]["NDCG@10"],
                    "palr": scored["palr"]["NDCG@10"],
                    "llm_alone": res["results"].get("LLM alone (end to end)", {}).get("test", {}).get("NDCG@10"),
                    "without_llm_features": (res["results"].get("same ranker without LLM features", {})
                                             .get("test", {}).get("NDCG@10")),
                    "stacked_not_chosen": res["results"].get(unused, {}).get("test", {}).get("NDCG@10")},
        "hr@10": {k: scored[k]["HR@10"] for k in scored},
        "vs_sasrec": {"palr": compare(d / "p.jsonl", d / "rp.jsonl", args.dataset, d / "cmp_palr_sasrec.json", log),
                      "trees": compare(d / "pt.jsonl", d / "rp.jsonl", args.dataset, d / "cmp_trees_sasrec.json",
                                       log),
                      "llm_alone": comp[llm_key]["test"]["NDCG@10"] if llm_key else None,
                      "stacked_not_chosen": comp[unused_key]["test"]["NDCG@10"] if unused_key in comp else None,
                      "without_llm_features": (comp[f"same ranker without LLM features vs {retr}"]["test"]["NDCG@10"]
                                               if f"same ranker without LLM features vs {retr}" in comp else None)},
        "palr_vs_trees_only": compare(d / "p.jsonl", d / "pt.jsonl", args.dataset, d / "cmp_palr_trees.json", log),
        "palr_vs_twin": comp[twin_key]["test"]["NDCG@10"] if twin_key else None,
        "candidate_recall_test": res.get("candidate_recall"),
        "candidate_recall_valid": valid.get("candidate_recall"),
        "ranking": json.loads((d / "palr" / "ranking.json").read_text()),
        "valid": {"llm_fused_with_retriever": valid["ndcg@10"], "llm": valid["ndcg@10_llm"],
                  "retriever": valid["ndcg@10_retriever"],
                  "trees_fused": (valid.get("features") or {}).get("ndcg@10"),
                  "stacked": {k: v for k, v in (valid.get("stacked") or {}).items()
                              if k not in ("features", "llm_feature_gain")},
                  "llm_feature_gain": (valid.get("stacked") or {}).get("llm_feature_gain")},
        "finetune_s": metrics.get("seconds"),
        "features_s": json.loads((d / "features" / "metrics.json").read_text())["valid"].get("total_seconds"),
        "ranking_ms_per_user": res["timings"].get("ranking_ms_per_user_median"),
        "ranking_ms_per_user_trees": fres["timings"].get("ranking_ms_per_user_median"),
        "wall_s": sec,
        "check_results_json": {"palr": abs(scored["palr"]["NDCG@10"]
                                           - res["results"]["PALR (end to end)"]["test"]["NDCG@10"]) < 1e-4,
                               "sasrec": abs(scored["sasrec"]["NDCG@10"] - res["results"][retr]["test"]["NDCG@10"])
                               < 1e-4},
    }
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| seed | model | NDCG@10 | HR@10 | NDCG@10 vs SASRec [95% CI] |", "|---|---|---:|---:|---:|"]
    for r in rows:
        n, h, v = r["ndcg@10"], r["hr@10"], r["vs_sasrec"]
        lines += [f"| {r['seed']} | SASRec | {n['sasrec']:.4f} | {h['sasrec']:.4f} | - |",
                  f"| {r['seed']} | trees only | {n['trees']:.4f} | {h['trees']:.4f} | {fmt(v['trees'])} |",
                  f"| {r['seed']} | LLM alone | {n['llm_alone'] or float('nan'):.4f} | - | {fmt(v['llm_alone'])} |",
                  f"| {r['seed']} | PALR (run default) | {n['palr']:.4f} | {h['palr']:.4f} | {fmt(v['palr'])} |"]
        if n["stacked_not_chosen"] is not None:
            lines.append(f"| {r['seed']} | stacked ranker with LLM features (not chosen on held-out users) | "
                         f"{n['stacked_not_chosen']:.4f} | - | {fmt(v['stacked_not_chosen'])} |")
        if n["without_llm_features"] is not None:
            lines.append(f"| {r['seed']} | same ranker without LLM features | {n['without_llm_features']:.4f} | - | "
                         f"{fmt(v['without_llm_features'])} |")
    head = ("| seed | PALR vs trees only | stacked vs its twin without LLM features | candidate recall (test) | "
            "ranker chosen on held-out users | fine-tune s | ranking ms/user |")
    lines += ["", head, "|---|---:|---:|---|---|---:|---:|"]
    for r in rows:
        st = r["valid"]["stacked"]
        chosen = ("stacked (LLM features)" if st.get("chosen") else
                  ("LLM + trees" if r["ranking"].get("features") else "LLM + retriever rank"))
        cr = {k: round(v, 4) for k, v in (r["candidate_recall_test"] or {}).items() if k != "sources"}
        lines.append(f"| {r['seed']} | {fmt(r['palr_vs_trees_only'])} | {fmt(r['palr_vs_twin'])} | {cr} | {chosen} "
                     f"(held-out: stacked {st.get('holdout_ndcg@10', float('nan')):.4f}, without LLM "
                     f"{st.get('holdout_ndcg@10_without_llm', float('nan')):.4f}, others {st.get('compared_with')}) | "
                     f"{r['finetune_s']} | {r['ranking_ms_per_user']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--sources", default="itemknn:10")  # chosen on ml-100k validation recall@50
    ap.add_argument("--out", default="/tmp/llm-features")
    args = ap.parse_args()
    rows = [one_seed(args, int(s)) for s in args.seeds.split(",")]
    out = Path(args.out)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
