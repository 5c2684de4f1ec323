"""Retriever runs: fit on the training split, validate, save with the data snapshot; evaluate models and seeds."""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from palr.core import distributed
from palr.core.console import log_to
from palr.core.io import write_json
from palr.core.metrics import DEFAULT_KS
from palr.core.options import flat
from palr.core.settings import DataSpec, TrainConfig
from palr.data import Split, as_spec, load_split
from palr.evaluate.retrievers import evaluate_retriever
from palr.evaluate.stats import summarize_seeds
from palr.evaluate.tables import (
    compare_ranks,
    comparison_pairs,
    statistics_protocol,
    write_candidates,
    write_per_user,
    write_predictions,
)
from palr.retrieval.base import Retriever, check_settings, make_retriever, retriever_class
from palr.runs.snapshot import SNAPSHOT_DIR, save_snapshot
from palr.runs.store import begin_run, dataset_info, finish_run

log = logging.getLogger(__name__)


def fit_retriever(name: str, split: Split, params: dict[str, Any] | None = None, seed: int = 0,
                  progress: bool = False, report: Callable[[int, dict[str, Any]], None] | None = None,
                  ) -> tuple[Retriever, float]:
    """Build and fit a retriever on ``split.train`` (validation only for early stopping); every random choice
    comes from ``seed`` (the retriever's own ``seed`` parameter), no global random state is touched.

    ``report(epoch, entry)`` is passed to retrievers whose ``fit`` takes it (SASRec: after each validation).
    """
    params = dict(params or {})
    cls = retriever_class(name)
    if "seed" in getattr(cls, "defaults", {}):
        params.setdefault("seed", seed)  # the run's seed seeds the model too; an explicit --param seed=N is kept
    model = make_retriever(name, **params)
    extra: dict[str, Any] = {"catalog": split.dataset.catalog} if getattr(cls, "needs_catalog", False) else {}
    if report is not None and "report" in inspect.signature(model.fit).parameters:
        extra["report"] = report
    t0 = time.perf_counter()
    model.fit(split.train, split.n_items, valid=(split.histories("valid"), split.targets("valid")),
              progress=progress, **extra)
    return model, time.perf_counter() - t0


def train_run(config: TrainConfig | DataSpec | str, retriever: str = "sasrec", out: str | Path | None = None, *,
              params: dict[str, Any] | None = None, seed: int = 0, data_dir: str | Path | None = None,
              progress: bool = True, overwrite: bool = False, ks: Sequence[int] = DEFAULT_KS) -> Path:
    """Train a retriever and save a run directory (args.json, config, weights, validation metrics, log).

    ``config`` is the command's TrainConfig, or a data set (name or DataSpec) with the other arguments.
    """
    if isinstance(config, TrainConfig):
        cfg = config
    else:
        if out is None:
            raise TypeError("train_run needs out= when not given a TrainConfig")
        cfg = TrainConfig(out=Path(out), data=as_spec(config, data_dir), retriever=retriever, params=dict(params or {}),
                          seed=seed, overwrite=overwrite)
    check_settings(cfg)
    spec = cfg.data.resolved()
    split = load_split(spec)
    args = {**flat(cfg), **flat(spec), "_dataset_fingerprint": dataset_info(split.dataset)["fingerprint"]}
    run = begin_run(cfg.out, overwrite=cfg.overwrite, args=args)
    with log_to(run / "train.log"):
        log.info("train %s on %s (%d users, %d items), seed %d, params %s", cfg.retriever, split.dataset.name,
                 split.dataset.n_users, split.n_items, cfg.seed, json.dumps(cfg.params, sort_keys=True))
        model, fit_s = fit_retriever(cfg.retriever, split, cfg.params, cfg.seed, progress)
        val = evaluate_retriever(model, split, "valid", ks, progress=progress)
        log.info("fit %s in %.1fs; valid %s", cfg.retriever, fit_s, json.dumps(val["metrics"]))
    save_retriever_run(run, model, split, cfg.retriever, seed=cfg.seed, data_dir=spec.data_dir, fit_s=fit_s,
                       valid=val, data=spec)
    return run


def save_retriever_run(run: Path, model: Retriever, split: Split, retriever: str, *, seed: int,
                       data_dir: str | Path | None, fit_s: float, valid: dict[str, Any],
                       data: DataSpec | None = None) -> None:
    """Write a fitted retriever as a complete run directory (``valid`` = ``evaluate_retriever`` on valid);
    ``data``: the data spec it was trained on (else the data set's name with ``data_dir``)."""
    model.save(run / "model")
    save_snapshot(run / SNAPSHOT_DIR, split.dataset)  # the run stands alone: later commands read no raw file
    metrics = {"valid": valid["metrics"],
               "timings": {"fit_s": round(fit_s, 3), "valid_eval_s": round(valid["seconds"], 3)}}
    history = getattr(model, "history", None)
    if history:
        metrics["history"] = history
    finish_run(run, "retriever", split.dataset, {"retriever": retriever, "params": model.params(), "seed": seed},
               metrics, data=flat((data or DataSpec(split.dataset.name, data_dir=Path(data_dir) if data_dir else None))
                                  .resolved()))


def evaluate_models(models: dict[str, Retriever], split: Split, out: str | Path | None = None,
                    predictions: str | Path | None = None, candidates: int = 0,
                    candidates_out: str | Path | None = None, ks: Sequence[int] = DEFAULT_KS,
                    timings: dict[str, Any] | None = None, progress: bool = True, *, seed: int = 0,
                    per_user: str | Path | None = None, baseline: str | None = None) -> dict[str, Any] | None:
    """Evaluate fitted retrievers on valid and test; write results.json, the first model's predictions and
    (``per_user``) every model's per-user test metrics. Ties are broken in the random order of ``seed``, the
    same in the metrics and in the written lists. Every model but the baseline (the first, unless named) is
    compared with it on the same users: paired-bootstrap 95% CIs of the difference and ratio, and a p-value.

    Under a launcher with several processes the users are split across them and gathered (identical figures);
    the main process writes the files and gets the document, the others get None."""

    pairs = comparison_pairs(list(models), baseline)
    results: dict[str, Any] = {}
    ranks: dict[str, dict[str, np.ndarray]] = {}
    timings = dict(timings or {})
    for i, (name, model) in enumerate(models.items()):
        entry: dict[str, Any] = {}
        ranks[name] = {}
        for stage in ("valid", "test"):
            r = evaluate_retriever(model, split, stage, ks, candidates=candidates if stage == "test" else 0,
                                   predictions=max(max(ks), 10), progress=progress and distributed.is_main(),
                                   seed=seed, sharded=True)
            if r is None:  # not the main process: its share is gathered there
                continue
            entry[stage] = r["metrics"]
            ranks[name][stage] = r["ranks"]
            timings[f"{name}.{stage}_eval_s"] = round(r["seconds"], 3)
            if stage == "test" and i == 0:
                if predictions:
                    write_predictions(predictions, split.dataset, r["predictions"])
                if candidates_out and candidates:
                    write_candidates(candidates_out, split.dataset, r["candidates"], r["candidate_scores"])
        results[name] = entry
    if not distributed.is_main():
        return None
    if distributed.world_size() > 1:
        timings["processes"] = distributed.world_size()
    if per_user:
        write_per_user(per_user, split.dataset, np.arange(split.dataset.n_users), split.targets("test"),
                       {name: r["test"] for name, r in ranks.items()}, ks)
    doc = {"protocol": {**split.dataset.protocol, "ks": list(ks), "candidates": candidates or None, "tie_seed": seed,
                        "retrievers_fit_on": "train split only (valid and test items never seen in fit)"},
           "dataset": dataset_info(split.dataset), "results": results,
           "comparisons": compare_ranks(ranks, pairs, ks), "statistics": statistics_protocol(),
           "timings": timings}
    if out:
        write_json(out, doc)
    return doc


def with_seed(path: str | Path | None, seed: int) -> Path | None:
    """predictions.jsonl -> predictions.seed3.jsonl (one file per seed)."""
    if path is None:
        return None
    p = Path(path)
    return p.with_name(f"{p.stem}.seed{seed}{p.suffix}")


def evaluate_seeds(names: Sequence[str], split: Split, seeds: Sequence[int], out: str | Path | None = None,
                   predictions: str | Path | None = None, per_user: str | Path | None = None,
                   baseline: str | None = None, candidates: int = 0, ks: Sequence[int] = DEFAULT_KS,
                   progress: bool = True, params: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Fit and evaluate each retriever once per seed (the seed of the model and of the tie order).

    ``results`` holds the mean over seeds, ``seed_summary`` mean / sd / n of every figure, ``by_seed`` each
    seed's results and comparisons (those of its own ``*.seedN.*`` predictions and per-user files), and
    ``comparisons_over_seeds`` the mean / sd over seeds of each comparison's difference and ratio.
    """
    if not seeds:
        raise ValueError("evaluate_seeds needs at least one seed")
    by_seed: dict[str, Any] = {}
    for s in seeds:
        models, timings = {}, {}
        for name in names:
            models[name], fit_s = fit_retriever(name, split, (params or {}).get(name), seed=s, progress=progress)
            timings[f"{name}.fit_s"] = round(fit_s, 3)
        doc = evaluate_models(models, split, None, with_seed(predictions, s), candidates, None, ks, timings, progress,
                              seed=s, per_user=with_seed(per_user, s), baseline=baseline)
        if doc is not None:  # None: not the main process of a launch (its users were gathered there)
            by_seed[str(s)] = {k: doc[k] for k in ("results", "comparisons", "timings")}
    if not by_seed:
        return None
    runs = list(by_seed.values())
    summary: dict[str, Any] = {}
    for m, stages in runs[0]["results"].items():
        summary[m] = {st: {k: summarize_seeds([r["results"][m][st][k] for r in runs])
                           for k, v in metrics.items() if isinstance(v, float)} for st, metrics in stages.items()}
    over: dict[str, Any] = {}
    for c, entry in runs[0]["comparisons"].items():
        over[c] = {"model": entry["model"], "baseline": entry["baseline"]}
        for st in ("valid", "test"):
            over[c][st] = {k: {f: summarize_seeds([r["comparisons"][c][st][k][f] for r in runs
                                                   if r["comparisons"][c][st][k][f] is not None])
                               for f in ("diff", "ratio") if runs[0]["comparisons"][c][st][k][f] is not None}
                           for k in entry[st]}
    doc = {"protocol": {**split.dataset.protocol, "ks": list(ks), "candidates": candidates or None,
                        "seeds": list(seeds), "results": "mean over seeds (seed_summary: mean, sd, n; by_seed: each "
                                                         "seed's figures, those of its *.seedN.* files)",
                        "retrievers_fit_on": "train split only (valid and test items never seen in fit)"},
           "dataset": dataset_info(split.dataset),
           "results": {m: {st: {**{k: v["mean"] for k, v in ms.items()}, "users": runs[0]["results"][m][st]["users"]}
                           for st, ms in stages.items()} for m, stages in summary.items()},
           "seed_summary": summary, "comparisons_over_seeds": over, "statistics": statistics_protocol(),
           "by_seed": by_seed}
    if out:
        write_json(out, doc)
    return doc
