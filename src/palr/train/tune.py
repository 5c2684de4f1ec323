"""``palr tune``: an Optuna search of a retriever's hyper-parameters on validation NDCG@10.

Each trial fits the retriever on the training split with the parameters Optuna proposes (TPE sampler,
seeded) and is scored by full-ranking NDCG@10 on the validation split (test is never looked at).
Retrievers that report a validation curve while they train (SASRec: after each validation, the smoothed
NDCG@10 when smoothing is on) are pruned on it: a trial whose value at an epoch is below the median of the
earlier trials at that epoch stops early (``MedianPruner``). The wall-clock ``budget`` covers the search: no
trial starts after it, and a reporting trial still running then is stopped at its next validation.

Search space: ``SPACES[retriever]`` maps a parameter to a spec, one of
  ``{"type": "float", "low": 0.1, "high": 0.5, "log": false}``,
  ``{"type": "int", "low": 1, "high": 3, "step": 1, "log": false}``,
  ``{"type": "categorical", "choices": [64, 128]}``,
  or a plain value (fixed in every trial).
A space file (JSON or TOML; either ``{param: spec}`` or ``{retriever: {param: spec}}``) is merged over the
default space; a parameter set to ``null`` (JSON) or ``"default"`` is dropped from the search. ``--param
key=value`` fixes a parameter in every trial.

Output directory: ``trials.csv`` and ``trials.json`` (one row per trial: number, state, value, seconds,
epochs reported, parameters), ``study.json`` (space, budget, best trial) and ``best/``, the best trial as a
complete retriever run (``palr evaluate --run OUT/best``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from palr.core.console import log_to
from palr.core.errors import PalrError
from palr.core.io import write_atomic, write_json
from palr.core.settings import DataSpec
from palr.data import Split, load_split
from palr.evaluate.retrievers import evaluate_retriever
from palr.retrieval.base import REGISTRY
from palr.runs.store import begin_run
from palr.train.retriever import fit_retriever, save_retriever_run

log = logging.getLogger(__name__)

# the default search spaces (each documented in SPACE_NOTES); parameters not named keep their defaults
SPACES: dict[str, dict[str, Any]] = {
    "sasrec": {
        "hidden": {"type": "categorical", "choices": [64, 128, 256]},
        "heads": {"type": "categorical", "choices": [1, 2]},
        "layers": {"type": "int", "low": 1, "high": 3},
        "dropout": {"type": "float", "low": 0.1, "high": 0.6},
        "lr": {"type": "float", "low": 3e-4, "high": 5e-3, "log": True},
        "batch_size": {"type": "categorical", "choices": [64, 128, 256]},
    },
    "itemknn": {
        "neighbours": {"type": "int", "low": 10, "high": 500, "log": True},
        "recent": {"type": "int", "low": 5, "high": 50},
        "decay": {"type": "float", "low": 0.5, "high": 1.0},
        "shrink": {"type": "float", "low": 0.0, "high": 100.0},
        "sequential": {"type": "categorical", "choices": [True, False]},
    },
    "als": {
        "factors": {"type": "categorical", "choices": [32, 64, 128, 256]},
        "regularization": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
        "alpha": {"type": "float", "low": 0.5, "high": 50.0, "log": True},
        "iterations": {"type": "int", "low": 5, "high": 30},
    },
    "bpr": {
        "factors": {"type": "categorical", "choices": [32, 64, 128]},
        "learning_rate": {"type": "float", "low": 1e-3, "high": 0.1, "log": True},
        "regularization": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
        "iterations": {"type": "int", "low": 20, "high": 200, "log": True},
    },
    "text": {
        "recent": {"type": "int", "low": 5, "high": 50},
        "decay": {"type": "float", "low": 0.5, "high": 1.0},
        "pop_weight": {"type": "float", "low": 0.0, "high": 1.0},
    },
    "popularity": {},
}
SPACE_NOTES = ("sasrec: width, heads, depth, dropout, learning rate and batch size (epochs stay data-filled, "
               "early stopping on); itemknn: neighbours, recent items, decay, shrinkage, transitions; als/bpr: "
               "factors, regularisation, alpha or learning rate, iterations; text: recent items, decay, "
               "popularity weight; popularity has no parameters (one trial).")


@dataclass
class TuneResult:
    """What a search found; ``best_run`` is a retriever run directory (None when no trial completed)."""

    out: Path
    best_value: float | None
    best_params: dict[str, Any]
    best_run: Path | None
    trials: list[dict[str, Any]] = field(default_factory=list)


def load_space_file(path: str | Path, retriever: str) -> dict[str, Any]:
    """A space file (JSON or TOML) -> {param: spec} for ``retriever``."""
    path = Path(path)
    if not path.exists():
        raise PalrError(f"space file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            doc = tomllib.loads(text)
        else:
            doc = json.loads(text)
    except ValueError as exc:
        raise PalrError(f"{path}: not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {exc}") from exc
    if not isinstance(doc, dict):
        raise PalrError(f"{path}: expected a mapping of parameter -> spec")
    doc = doc.get("space", doc)
    if retriever in doc and isinstance(doc[retriever], dict):
        doc = doc[retriever]
    return dict(doc)


def search_space(retriever: str, override: dict[str, Any] | None = None,
                 fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The default space for ``retriever`` with ``override`` merged over it and ``fixed`` parameters removed."""

    if retriever not in REGISTRY:
        raise PalrError(f"unknown retriever {retriever!r}; known: {', '.join(sorted(REGISTRY))}")
    space = dict(SPACES.get(retriever, {}))
    for key, spec in (override or {}).items():
        if spec is None or spec == "default":
            space.pop(key, None)
        else:
            space[key] = spec
    for key in fixed or {}:
        space.pop(key, None)
    for key, spec in space.items():
        check_spec(key, spec)
    return space


def check_spec(key: str, spec: Any) -> None:
    if not isinstance(spec, dict):
        return  # a fixed value
    kind = spec.get("type")
    if kind == "categorical":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise PalrError(f"search space {key}: 'categorical' needs a non-empty 'choices' list")
    elif kind in ("float", "int"):
        if "low" not in spec or "high" not in spec or not spec["low"] <= spec["high"]:
            raise PalrError(f"search space {key}: {kind!r} needs 'low' <= 'high', got {spec}")
        if spec.get("log") and spec["low"] <= 0:
            raise PalrError(f"search space {key}: a log scale needs 'low' > 0, got {spec['low']}")
    else:
        raise PalrError(f"search space {key}: 'type' must be float, int or categorical, got {kind!r}")


def suggest(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    """Optuna's proposal for every parameter of ``space`` (fixed values passed through)."""
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            out[key] = spec
        elif spec["type"] == "categorical":
            out[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            out[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                         log=bool(spec.get("log", False)))
        else:
            out[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)))
    return out


def tune(dataset: str, retriever: str, out: str | Path, *, budget_s: float = 600.0, trials: int | None = None,
         space: dict[str, Any] | None = None, fixed: dict[str, Any] | None = None, seed: int = 0,
         pruner: str = "median", data_dir: str | Path | None = None, split: Split | None = None,
         enqueue: list[dict[str, Any]] | None = None, data: DataSpec | None = None,
         progress: bool = False) -> TuneResult:
    """Search ``retriever``'s hyper-parameters on validation NDCG@10 within ``budget_s`` seconds.

    ``enqueue``: parameter sets tried first, in order (e.g. the current defaults), before the sampler's.
    ``data``: the data spec (``csv:`` columns, items file) saved with the best run, as ``palr train`` does.
    """
    import optuna

    if budget_s <= 0:
        raise PalrError(f"the budget must be > 0 seconds, got {budget_s}")
    if pruner not in ("median", "none"):
        raise PalrError(f"pruner must be 'median' or 'none', got {pruner!r}")
    fixed = dict(fixed or {})
    space = search_space(retriever, space, fixed)
    split = split if split is not None else load_split(dataset, data_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_trials = 1 if not any(isinstance(v, dict) for v in space.values()) else trials
    deadline = time.monotonic() + budget_s
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2) if pruner == "median"
        else optuna.pruners.NopPruner())
    for params in enqueue or []:
        study.enqueue_trial(params, skip_if_exists=True)
    best: dict[str, Any] = {"value": -math.inf, "run": None}

    def objective(trial: optuna.Trial) -> float:
        params = {**suggest(trial, space), **fixed}
        trial.set_user_attr("params", params)

        def report(epoch: int, entry: dict[str, Any]) -> None:
            value = entry.get("valid_NDCG@10_smoothed", entry.get("valid_NDCG@10"))
            if value is None:
                return
            trial.report(float(value), epoch)
            trial.set_user_attr("epochs", epoch)
            if time.monotonic() > deadline:
                trial.set_user_attr("stopped", "budget")
                raise optuna.TrialPruned()
            if trial.should_prune():
                trial.set_user_attr("stopped", "pruned")
                raise optuna.TrialPruned()

        try:
            model, fit_s = fit_retriever(retriever, split, params, seed, progress, report)
        except PalrError as exc:  # an impossible combination (e.g. hidden not divisible by heads)
            trial.set_user_attr("error", str(exc))
            raise optuna.TrialPruned() from exc
        val = evaluate_retriever(model, split, "valid")
        value = float(val["metrics"]["NDCG@10"])
        trial.set_user_attr("fit_s", round(fit_s, 2))
        if value > best["value"]:
            run = begin_run(out / "best")
            with log_to(run / "train.log"):
                log.info("tune %s on %s: trial %d, valid NDCG@10 %.5f, params %s", retriever, split.dataset.name,
                         trial.number, value, json.dumps(params, sort_keys=True))
            save_retriever_run(run, model, split, retriever, seed=seed, data_dir=data_dir, fit_s=fit_s, valid=val,
                               data=data)
            best.update(value=value, run=run, params=model.params(), trial=trial.number)
        return value

    study.optimize(objective, n_trials=n_trials, timeout=budget_s, catch=(), gc_after_trial=True)
    rows = trial_rows(study)
    write_trials(out, rows)
    best_doc = None
    if best["run"] is not None:
        best_doc = {"trial": best["trial"], "value": best["value"], "params": best["params"], "run": str(best["run"])}
    write_json(out / "study.json", {"dataset": split.dataset.name, "retriever": retriever,
                                    "objective": "valid NDCG@10 (full ranking)", "budget_s": budget_s,
                                    "trials": len(rows), "seed": seed, "pruner": pruner, "space": space,
                                    "fixed": fixed, "best": best_doc})
    return TuneResult(out, best["value"] if best["run"] else None, best.get("params", {}), best["run"], rows)


def trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                     "last_reported": last, "epochs": t.user_attrs.get("epochs"),
                     "stopped": t.user_attrs.get("stopped", t.user_attrs.get("error", "")),
                     "seconds": None if seconds is None else round(seconds, 2),
                     "params": t.user_attrs.get("params", t.params)})
    return rows


def write_trials(out: Path, rows: list[dict[str, Any]]) -> None:
    """trials.json (as is) and trials.csv (one column per parameter)."""
    write_json(out / "trials.json", rows)
    keys = sorted({k for r in rows for k in r["params"]})
    cols = ["number", "state", "value", "last_reported", "epochs", "stopped", "seconds"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols + keys)
    for r in rows:
        w.writerow([r[c] for c in cols] + [r["params"].get(k, "") for k in keys])
    write_atomic(out / "trials.csv", buf.getvalue())
