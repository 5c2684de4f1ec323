"""Zero-shot ranking with any LLM, local (``hf:``) and served (``openai:`` against ``palr model serve``).

For a retriever run (SASRec on ml-100k) and a text LLM (Gemma 3 270M from ``palr model import gemma-3-270m``):

1. ``hf:GEMMA``: the LLM ranks the retriever's top-N for a seeded sample of test users; the fusion weight is chosen
   on as many seeded validation users; NDCG@10 of the LLM alone and fused vs the retriever on the same users
   (paired-bootstrap 95% CI), ms per user, failure share.
2. The same model served by ``palr model serve hf:GEMMA`` and used through ``openai:gemma@URL``: the same figures,
   and how often the served ranking equals the local one.
3. LLM profiles through the served model for 20 seeded users (how many are LLM-written, every keyword grounded),
   and sample explanations.
4. Optionally (``--palr-run``) the embedded fine-tuned model: local vs served by ``palr model serve mini:RUN/llm``.

    PALR_DATA_DIR=... python benchmarks/zero_shot.py --sasrec-run RUN --gemma DIR [--palr-run RUN] --out DIR

Writes ``DIR/summary.json`` (and each evaluation's results JSON); prints the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from palr.evaluate.palr import evaluate_palr_run
from palr.evaluate.stats import paired_bootstrap
from palr.llm.server import free_port
from palr.rank.pipeline import PALR
from palr.rank.profiles import grounded_keywords


def serve(spec: str, name: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`palr model serve SPEC` in a subprocess; returns it and its base URL once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "palr.cli", "model", "serve", spec, "--port", str(port),
                             "--name", name], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited; see {log}")
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


def summarise(doc: dict[str, Any], retr: str) -> dict[str, Any]:
    res = doc["results"]
    out = {"users": doc["protocol"]["test_users"], "llm": doc["protocol"]["llm"],
           "fusion": [doc["protocol"]["fusion"], doc["protocol"]["fusion_weight"]],
           "ndcg10_retriever": res[f"{retr} (retriever)"]["test"]["NDCG@10"],
           "ndcg10_llm_alone": res["LLM alone (end to end)"]["test"]["NDCG@10"],
           "ndcg10_fused": res["PALR (end to end)"]["test"]["NDCG@10"],
           "ms_per_user_batched": doc["timings"]["ranking_ms_per_user_batched"],
           "ms_per_user_median": doc["timings"].get("ranking_ms_per_user_median"),
           "llm_failures": doc["llm_failures"], "failure_share": doc["llm_failure_share"],
           "request_failures": doc["llm"]["request_failures"], "scoring": doc["llm"]["scoring"]}
    ranks = doc["ranks"]
    for name, key in (("llm_alone", "LLM alone (end to end)"), ("fused", "PALR (end to end)")):
        from palr.core.metrics import per_user_ndcg

        c = paired_bootstrap(per_user_ndcg(np.asarray(ranks[key]["test"]), 10),
                             per_user_ndcg(np.asarray(ranks[f"{retr} (retriever)"]["test"]), 10), seed=0)
        out[f"{name}_vs_retriever"] = {"diff": round(c.diff, 4), "diff_ci95": [round(x, 4) for x in c.diff_ci95],
                                       "p_value": round(c.p_value, 4)}
    return out


def evaluate(run: str, llm: str | None, out: Path, users: int, valid_users: int,
             fusion: tuple[str, float] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    kind, weight = fusion if fusion else (None, None)
    doc = evaluate_palr_run(run, out=out / "results.json", predictions=out / "preds.jsonl", llm=llm,
                            allow_fallback=True, n_users=users, seed=0, valid_users=valid_users, latency_users=10,
                            progress=False, fusion=kind, weight=weight)
    assert doc is not None
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    return doc


def same_order(a: Path, b: Path) -> float:
    ra = [json.loads(x)["items"][:10] for x in a.read_text().splitlines()]
    rb = [json.loads(x)["items"][:10] for x in b.read_text().splitlines()]
    return float(np.mean([x == y for x, y in zip(ra, rb)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sasrec-run", required=True)
    ap.add_argument("--gemma", required=True, help="directory written by `palr model import gemma-3-270m`")
    ap.add_argument("--palr-run", help="a fine-tuned PALR run (embedded model) over the same retriever")
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--valid-users", type=int, default=100, help="validation users the fusion is chosen on (hf run; "
                    "the served run reuses that choice)")
    ap.add_argument("--profile-users", type=int, default=20)
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: hf,openai,profiles,mini")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    summary: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
                               "users": args.users, "valid_users": args.valid_users}
    retr = "sasrec"
    if "hf" not in skip:
        (out / "hf").mkdir(exist_ok=True)
        doc = evaluate(args.sasrec_run, f"hf:{args.gemma}", out / "hf", args.users, args.valid_users)
        summary["gemma_hf"] = {**summarise(doc, retr), "wall_s": doc["wall_s"]}
        print(json.dumps(summary["gemma_hf"]), flush=True)
    if not {"openai", "profiles"} <= skip:
        proc, url = serve(f"hf:{args.gemma}", "gemma", out / "server_gemma.log")
        try:
            spec = f"openai:gemma@{url}"
            if "openai" not in skip:
                (out / "openai").mkdir(exist_ok=True)
                chosen = summary.get("gemma_hf", {}).get("fusion")
                doc = evaluate(args.sasrec_run, spec, out / "openai", args.users, args.valid_users,
                               tuple(chosen) if chosen else None)
                summary["gemma_openai"] = {**summarise(doc, retr), "wall_s": doc["wall_s"]}
                if "hf" not in skip:
                    summary["gemma_openai"]["same_top10_as_hf"] = same_order(out / "hf" / "preds.jsonl",
                                                                            out / "openai" / "preds.jsonl")
                print(json.dumps(summary["gemma_openai"]), flush=True)
            if "profiles" not in skip:
                palr = PALR.load(args.sasrec_run, llm=spec, allow_fallback=False)
                ds = palr.split.dataset
                rng = np.random.default_rng(0)
                users = [ds.user_ids[u] for u in np.sort(rng.choice(ds.n_users, args.profile_users, replace=False))]
                t0 = time.perf_counter()
                from palr.llm.openai import OpenAILLM
                from palr.rank.profiles import LLMProfiler, profile_users

                slow_ok = OpenAILLM("gemma", url, timeout=900, concurrency=1)  # a CPU server: requests queue
                profs = profile_users(ds, users, LLMProfiler(slow_ok))
                secs = time.perf_counter() - t0
                rows, grounded_all = [], True
                for p in profs:
                    hist = ds.sequences[ds.user_index(p.user)]
                    _kept, dropped = grounded_keywords(p.keywords, ds.catalog, hist) if p.source == "llm" else ([], [])
                    grounded_all &= not dropped
                    rows.append({"user": p.user, "source": p.source, "profile": p.profile, "note": p.note})
                summary["profiles"] = {"users": len(profs), "llm": sum(p.source == "llm" for p in profs),
                                       "all_llm_keywords_grounded": grounded_all, "seconds": round(secs, 1),
                                       "samples": rows[:5]}
                rec = palr.recommend(user="1", k=5, explain=True)
                summary["recommend_user_1_openai"] = rec.to_dict()
                print(json.dumps(summary["profiles"]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if args.palr_run and "mini" not in skip:
        (out / "mini_local").mkdir(exist_ok=True)
        (out / "mini_openai").mkdir(exist_ok=True)
        local = evaluate(args.palr_run, None, out / "mini_local", args.users, 0)
        proc, url = serve(f"mini:{Path(args.palr_run) / 'llm'}", "palr", out / "server_mini.log")
        try:
            served = evaluate(args.palr_run, f"openai:palr@{url}", out / "mini_openai", args.users, 0)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        summary["mini_local"] = {**summarise(local, retr), "wall_s": local["wall_s"]}
        summary["mini_openai"] = {**summarise(served, retr), "wall_s": served["wall_s"],
                                  "same_top10_as_local": same_order(out / "mini_local" / "preds.jsonl",
                                                                   out / "mini_openai" / "preds.jsonl")}
        print(json.dumps({"mini_local": summary["mini_local"], "mini_openai": summary["mini_openai"]}), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"wrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
