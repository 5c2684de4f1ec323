"""`palr demo`: the whole of PALR on one data set with the embedded model, start to finish.

data -> SASRec retriever -> attribute profiles -> fine-tuned mini LLM ranker -> evaluation table ->
three example users with profile, recommendations and explanations. Every step leaves its files in
``out`` (retriever run, PALR run, results.json, predictions), so nothing is lost if a later step fails.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from palr.core.settings import ExampleConfig, FinetuneConfig, TrainConfig
from palr.data import as_spec

# the full demo trains its retriever as `palr train` does (TrainConfig's defaults, one definition); --quick
# shortens the training
QUICK_RETRIEVER: dict[str, Any] = {"epochs": 15, "patience": 3}
# fine-tuning settings of the full and the --quick demo
FINETUNE: dict[str, dict[str, Any]] = {
    "full": {"epochs": 3.0, "positions_per_user": 10},
    "quick": {"epochs": 1.0, "positions_per_user": 3},
}


def retriever_config(dataset: str, out: str | Path, *, quick: bool = False, data_dir: str | Path | None = None,
                     seed: int = 0, overwrite: bool = False) -> TrainConfig:
    """The demo's `palr train`: TrainConfig's defaults (SASRec with its own defaults), QUICK_RETRIEVER with --quick."""
    cfg = TrainConfig(out=Path(out) / "retriever", data=as_spec(dataset, data_dir), seed=seed, overwrite=overwrite)
    if quick:
        cfg = replace(cfg, params={**cfg.params, **QUICK_RETRIEVER})
    return cfg


def run_demo(dataset: str = "ml-100k", out: str | Path = "runs/demo", *, quick: bool = False,
             data_dir: str | Path | None = None, seed: int = 0, users: int = 3,
             console: Console | None = None, overwrite: bool = False) -> dict[str, Any]:
    from palr.data import load_dataset
    from palr.evaluate.palr import evaluate_palr_run
    from palr.evaluate.retrievers import results_table
    from palr.evaluate.tables import comparisons_table
    from palr.rank.pipeline import PALR
    from palr.train.finetune import finetune
    from palr.train.retriever import train_run

    con = console or Console()
    out = Path(out)
    t0 = time.perf_counter()
    fparams = FINETUNE["quick" if quick else "full"]
    ds = load_dataset(dataset, data_dir)
    st = ds.stats()
    con.rule(f"[bold]PALR demo on {dataset}[/bold]" + (" (quick)" if quick else ""))
    con.print(f"1/5 data: {st['users']:,} users, {st['items']:,} items, {st['interactions']:,} interactions "
              "(5-core, leave-one-out)")

    con.print("2/5 retrieval: training SASRec on the training split (early stopping on validation NDCG@10)")
    rcfg = retriever_config(dataset, out, quick=quick, data_dir=data_dir, seed=seed, overwrite=overwrite)
    rrun = train_run(rcfg, progress=True)
    rval = json.loads((rrun / "metrics.json").read_text())["valid"]
    con.print(f"    SASRec valid NDCG@10 {rval['NDCG@10']:.4f}, HR@10 {rval['HR@10']:.4f}")

    con.print("3/5 profiles + 4/5 fine-tuning the embedded LLM to rank SASRec's top-50 (verbalizer)")
    ex = ExampleConfig(positions_per_user=int(fparams["positions_per_user"]), seed=seed)
    cfg = FinetuneConfig(base_model="mini", epochs=float(fparams["epochs"]), examples=ex, seed=seed,
                         valid_users=500 if quick else 1000)
    # the PALR run belongs to this retriever: same settings and retriever resume it, a retrained one replaces it
    prun = finetune(rrun, out / "palr", cfg, progress=True, overwrite=True)  # reads the run's data snapshot

    con.print("5/5 evaluation on the test split (full ranking; a retrieval miss counts as a miss)")
    doc = evaluate_palr_run(prun, out=out / "results.json", predictions=out / "predictions.jsonl",
                            retriever_predictions=out / "retriever_predictions.jsonl")
    con.print(results_table(doc["results"], "test", labels=doc.get("ranked_by")))
    con.print(comparisons_table(doc["comparisons"], "test"))
    con.print(f"PALR ranked by: {doc['protocol']['ranked_by']}", highlight=False, markup=False)
    t = doc["timings"]
    con.print(f"ranking: median {t['ranking_ms_per_user_median']:.1f} ms per user for "
              f"{doc['protocol']['candidates']} candidates (one forward pass); fusion weight "
              f"{doc['protocol']['fusion_weight']} chosen on validation users")

    palr = PALR.load(prun)
    examples = []
    for user in ds.user_ids[:users]:
        rec = palr.recommend(user=user, k=5, explain=True)
        examples.append(rec.to_dict())
        lines = [f"[bold]profile:[/bold] {escape(rec.profile)}"]
        for k, it in enumerate(rec.items, 1):
            lines.append(f"{k}. {escape(it['title'])}  [dim](score {it['score']:.3f}, SASRec rank "
                         f"{it['retriever_rank']})[/dim]\n   {escape(it.get('explanation', ''))}")
        con.print(Panel("\n".join(lines), title=f"user {escape(user)}", expand=False))
    (out / "examples.json").write_text(json.dumps(examples, indent=2))
    from palr.evaluate.report import write_report

    report = write_report([prun], out / "report.html", n_examples=users, seed=seed)
    con.print(f"done in {time.perf_counter() - t0:.0f} s; everything is in {out}/ "
              f"(retriever/, palr/, results.json, predictions.jsonl, examples.json, report.html)")
    con.print(f"report: {report.resolve()}")
    return doc
