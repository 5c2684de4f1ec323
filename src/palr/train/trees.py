"""``palr finetune --run RETRIEVER_RUN --ranker features --out F``: a complete PALR run whose ranker is the trees of
:mod:`palr.rank.trees` alone (same candidate sources as the PALR run, so the comparison is fair)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from palr.rank.features import CandidateFeatures
from palr.rank.llm_ranker import RankingConfig
from palr.rank.stacked import fit_stacked
from palr.rank.trees import FeatureRankerConfig, fit_feature_ranker, split_users
from palr.retrieval.candidates import CandidateSources, candidates_for, parse_sources
from palr.retrieval.load import load_run
from palr.runs.snapshot import link_snapshot
from palr.runs.store import begin_run, finish_run


def retriever_name(rcfg: dict[str, Any]) -> str:
    r = rcfg["config"]["retriever"]
    return str(r["retriever"] if isinstance(r, dict) else r)


def train_feature_run(retriever_run: str | Path, out: str | Path, cfg: FeatureRankerConfig, *,
                      data_dir: str | Path | None = None, sources: str = "") -> Path:
    """`palr finetune --ranker features`: a complete PALR run whose ranker is the feature re-ranker.

    ``sources`` (e.g. ``itemknn:10,popularity:5``): candidates merged from several retrievers, as
    ``palr finetune --sources`` merges them; the trees then read every source's score and rank too (the stacked
    ranker without LLM features, fitted on the same users as the full PALR run's twin)."""
    import shutil
    from dataclasses import asdict, replace


    t0 = time.perf_counter()
    rcfg, retriever, split = load_run(retriever_run, data_dir)
    out = begin_run(out)
    if not (out / "retriever" / "retriever.json").exists():
        shutil.copytree(Path(retriever_run) / "model", out / "retriever", dirs_exist_ok=True)
    ranking = RankingConfig(ranker="features", mode="features", style="features", weight=0.0, fusion="trees",
                            n_candidates=cfg.n_candidates, history_len=0, profiles=False, ranker_dir="ranker")
    if parse_sources(sources):
        merged = CandidateSources.fit(split, retriever, retriever_name(rcfg), cfg.n_candidates, sources)
        cands, cscores, src = merged.merged_for(split, "valid")
        feats = CandidateFeatures().fit(split, cfg.text_encoder, cfg.seed)
        fit_u, hold_u = split_users(len(split.train), cfg.holdout, cfg.seed)
        stacked, metrics = fit_stacked(split, (cands, cscores), cfg, fit_users=fit_u, held_out=hold_u,
                                       features=feats, sources=merged, source_feats=src)
        metrics["candidate_recall"] = merged.recall(split, "valid")
        metrics["text_encoder"] = feats.text_encoder
        stacked.save(out / "ranker")
        merged.save(out / "candidate_sources")
        ranking = replace(ranking, fusion="stacked", stacked={"dir": "ranker", "chosen": True, "llm_features": False},
                          candidates={"dir": "candidate_sources", "counts": merged.counts})
        metrics["feature_gain"] = dict(zip(metrics["features"], stacked.booster.feature_importance("gain").round(1)
                                           .tolist()))
    else:
        valid = candidates_for(retriever, split, "valid", cfg.n_candidates)
        ranker, metrics = fit_feature_ranker(split, valid, cfg)
        ranker.save(out / "ranker")
    written = ranking.write(out)
    metrics["total_seconds"] = round(time.perf_counter() - t0, 1)
    config = {"feature_ranker": asdict(cfg), "sources": sources, "retriever": rcfg["config"], "ranking": written}
    link_snapshot(retriever_run, out)  # the run reads its retriever run's data snapshot, CSV columns and all
    finish_run(out, "palr", split.dataset, config, {"valid": metrics}, data=rcfg.get("data"),
               inputs={"retriever_run": str(Path(retriever_run).resolve())})
    (out / "feature_gain.json").write_text(json.dumps(metrics["feature_gain"], indent=1))
    return out
