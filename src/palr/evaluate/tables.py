"""Comparisons with their uncertainty, per-user files, and ranks read back from written predictions.

results.json carries, for every comparison (a model against its baseline on the same users),
``{"model", "baseline", "test": {metric: Comparison.to_dict()}}``: the means, the difference and the
ratio with their paired-bootstrap 95% intervals, and the paired t-test's p-value. The per-user file is a
CSV, one row per (user, model): ``user,target,model,rank,HR@5,NDCG@5,MRR@5,...`` (rank empty where the
target was not among the re-ranked candidates), which ``palr compare`` reads back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from palr.core.errors import PalrError
from palr.core.io import write_atomic
from palr.core.metrics import DEFAULT_KS, per_user_metrics
from palr.data.dataset import Dataset, Split, Stage
from palr.evaluate.stats import CI_METHOD, P_VALUE_TEST, Comparison, compare_metrics

MISS = 10**9  # the rank of a target that is not in a list (any metric@k counts it as a miss)
N_BOOT = 2000


def statistics_protocol(n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    return {"intervals": f"{CI_METHOD}, 95%", "p_value": P_VALUE_TEST, "n_boot": n_boot, "seed": seed,
            "ratio": "mean(model) / mean(baseline)"}


def comparison_pairs(models: Sequence[str], baseline: str | None = None) -> list[tuple[str, str]]:
    """(model, baseline) for every model but the baseline (the first model unless named)."""
    if not models:
        return []
    base = models[0] if baseline is None else baseline
    if base not in models:
        raise PalrError(f"--baseline {base!r} is not among the evaluated models: {', '.join(models)}")
    return [(m, base) for m in models if m != base]


def compare_ranks(ranks: Mapping[str, Mapping[str, np.ndarray]], pairs: Sequence[tuple[str, str]],
                  ks: Sequence[int] = DEFAULT_KS, *, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """{"A vs B": {"model": A, "baseline": B, stage: {metric: Comparison dict}}} from ranks[model][stage]."""
    out: dict[str, Any] = {}
    for a, b in pairs:
        entry: dict[str, Any] = {"model": a, "baseline": b}
        for stage in ranks[a]:
            if stage in ranks[b]:
                comp = compare_metrics(per_user_metrics(ranks[a][stage], ks), per_user_metrics(ranks[b][stage], ks),
                                       n_boot=n_boot, seed=seed)
                entry[stage] = {m: c.to_dict() for m, c in comp.items()}
        out[f"{a} vs {b}"] = entry
    return out


def _fmt_interval(value: float | None, ci: Sequence[float | None], digits: int, suffix: str = "") -> str:
    if value is None or ci[0] is None or ci[1] is None:
        return "n/a"
    return f"{value:.{digits}f}{suffix} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def comparisons_table(comparisons: Mapping[str, Any], stage: Stage = "test", metric: str = "NDCG@10") -> Any:
    """A rich Table (80 columns): each comparison's ratio of ``metric`` with its 95% CI and the p-value (the
    differences and their CIs are in results.json)."""
    from rich.table import Table

    table = Table(title=f"{stage} {metric}: model / baseline, paired bootstrap 95% CI over users")
    table.add_column("model vs baseline", min_width=16)
    table.add_column(f"{metric} ratio [95% CI]", justify="right", no_wrap=True)
    table.add_column("p", justify="right", no_wrap=True)
    for name, entry in comparisons.items():
        c = entry.get(stage, {}).get(metric)
        if c is None:
            continue
        p = c["p_value"]
        table.add_row(name, _fmt_interval(c["ratio"], c["ratio_ci95"], 3, "x"), "n/a" if p is None else f"{p:.2g}")
    return table


def compare_table(doc: Mapping[str, Any]) -> Any:
    """A rich Table (80 columns) of :func:`compare_sides`' result: one row a metric (differences and their CIs
    are in the JSON)."""
    from rich.table import Table

    table = Table(title=f"{doc['model']} vs {doc['baseline']}: {doc['users']} users, paired bootstrap 95% CI")
    for col in ("metric", "model", "baseline", "ratio [95% CI]", "p"):
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
    for m, c in doc["metrics"].items():
        p = c["p_value"]
        table.add_row(m, f"{c['mean_a']:.4f}", f"{c['mean_b']:.4f}", _fmt_interval(c["ratio"], c["ratio_ci95"], 3, "x"),
                      "n/a" if p is None else f"{p:.2g}")
    return table


# ---------------------------------------------------------------------------- per-user files
def write_per_user(path: str | Path, dataset: Dataset, users: Sequence[int], targets: np.ndarray,
                   ranks: Mapping[str, np.ndarray], ks: Sequence[int] = DEFAULT_KS) -> None:
    """CSV, one row per (user, model): user, target (original ids), model, rank, then each per-user metric."""
    import pandas as pd


    users = np.asarray(users)
    user_ids = np.asarray(dataset.user_ids, dtype=object)[users]
    target_ids = np.asarray(dataset.catalog.item_ids, dtype=object)[np.asarray(targets)]
    frames = []
    for model, r in ranks.items():
        r = np.asarray(r)
        cols: dict[str, Any] = {"user": user_ids, "target": target_ids, "model": model,
                                "rank": pd.array(np.where(r >= MISS, 0, r), dtype="Int64")}
        cols["rank"][r >= MISS] = pd.NA
        cols.update(per_user_metrics(r, ks))
        frames.append(pd.DataFrame(cols))
    write_atomic(path, pd.concat(frames, ignore_index=True).to_csv(index=False, lineterminator="\n"))


def read_per_user(path: str | Path, model: str | None = None) -> tuple[list[str], dict[str, np.ndarray], str]:
    """(user ids, {metric: (U,) values}, model name) of one model in a per-user CSV (the only one, or ``model``)."""
    import pandas as pd

    df = pd.read_csv(path, dtype={"user": str, "target": str, "model": str}, keep_default_na=False)
    if not {"user", "model"} <= set(df.columns):
        raise PalrError(f"{path}: not a per-user file (needs columns user, model, and metrics)")
    models = list(dict.fromkeys(df["model"]))
    if model is None:
        if len(models) != 1:
            raise PalrError(f"{path} holds several models ({'; '.join(models)}): name one")
        model = models[0]
    if model not in models:
        raise PalrError(f"{path} has no model {model!r} (it has: {'; '.join(models)})")
    sub = df[df["model"] == model]
    metrics = {c: sub[c].to_numpy(dtype=np.float64) for c in df.columns if "@" in c}
    return sub["user"].tolist(), metrics, model


def ranks_from_predictions(path: str | Path, split: Split, stage: Stage = "test") -> tuple[list[str], np.ndarray, int]:
    """(user ids, (U,) 1-based rank of each user's ``stage`` target in its list (MISS if absent), shortest list)."""
    dataset = split.dataset
    targets = split.targets(stage)
    users: list[str] = []
    ranks: list[int] = []
    shortest = MISS
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                user, items = str(rec["user"]), [str(i) for i in rec["items"]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise PalrError(f"{path}:{n}: not a prediction line ({{\"user\": ID, \"items\": [IDs]}}): {e}") from None
            try:
                u = dataset.user_index(user)
            except KeyError:
                raise PalrError(f"{path}:{n}: user {user!r} is not in {dataset.name}") from None
            target = dataset.catalog.item_ids[targets[u]]
            users.append(user)
            ranks.append(items.index(target) + 1 if target in items else MISS)
            shortest = min(shortest, len(items))
    if not users:
        raise PalrError(f"{path}: no predictions")
    return users, np.asarray(ranks, dtype=np.int64), shortest


def load_side(path: str | Path, split: Split | None, stage: Stage, model: str | None,
              ks: Sequence[int]) -> tuple[list[str], dict[str, np.ndarray], str]:
    """One side of ``palr compare``: a per-user CSV or a predictions JSONL (scored against ``split``)."""
    path = Path(path)
    if not path.is_file():
        raise PalrError(f"{path} does not exist")
    if path.suffix.lower() == ".csv":
        return read_per_user(path, model)
    if split is None:
        raise PalrError(f"{path}: scoring a predictions file needs the data set (--dataset)")
    users, ranks, shortest = ranks_from_predictions(path, split, stage)
    too_long = [k for k in ks if k > shortest]
    if too_long:
        raise PalrError(f"{path}: lists of {shortest} items cannot give metrics @{too_long[0]}; use --k up to {shortest}")
    return users, per_user_metrics(ranks, ks), model or path.stem


def compare_sides(a: tuple[list[str], dict[str, np.ndarray], str], b: tuple[list[str], dict[str, np.ndarray], str],
                  metrics: Sequence[str] | None = None, *, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Pair the two sides by user id (users present in both) and compare every common metric."""
    ua, ma, na = a
    ub, mb, nb = b
    pos_b = {u: j for j, u in enumerate(ub)}
    both = [(i, pos_b[u]) for i, u in enumerate(ua) if u in pos_b]
    if not both:
        raise PalrError(f"{na} and {nb} have no user in common")
    ia, ib = (np.array(x) for x in zip(*both))
    names = [m for m in (metrics or ma) if m in ma and m in mb]
    if not names:
        raise PalrError(f"no metric in common (asked: {', '.join(metrics or [])})")
    comp: dict[str, Comparison] = compare_metrics({m: ma[m][ia] for m in names}, {m: mb[m][ib] for m in names},
                                                  names, n_boot=n_boot, seed=seed)
    return {"model": na, "baseline": nb, "users": len(both), "only_in_model": len(ua) - len(both),
            "only_in_baseline": len(ub) - len(both), "statistics": statistics_protocol(n_boot, seed),
            "metrics": {m: c.to_dict() for m, c in comp.items()}}


def seeds_table(summary: Mapping[str, Any], stage: Stage = "test",
                columns: Sequence[str] = ("HR@10", "NDCG@10", "NDCG@20")) -> Any:
    """A rich Table of mean ± sd over seeds (``seed_summary`` of results.json)."""
    from rich.table import Table

    n = next((v["n"] for st in summary.values() for v in st.get(stage, {}).values()), 0)
    table = Table(title=f"{stage}: mean ± sd over {n} seeds")
    table.add_column("model", min_width=12)
    for c in columns:
        table.add_column(c, justify="right", no_wrap=True)
    for model, by_stage in summary.items():
        m = by_stage.get(stage, {})
        table.add_row(model, *(f"{m[c]['mean']:.4f} ± {m[c]['sd']:.4f}" if c in m else "" for c in columns))
    return table


def write_predictions(path: str | Path, dataset: Dataset, items: np.ndarray, users: Sequence[int] | None = None) -> None:
    """JSONL, one line a user: {"user": original id, "items": [original ids, best first]} (atomic)."""
    users = range(len(items)) if users is None else users
    ids = dataset.catalog.item_ids
    lines = [json.dumps({"user": dataset.user_ids[u], "items": [ids[i] for i in row]}) for u, row in zip(users, items)]
    write_atomic(path, "\n".join(lines) + "\n")


def write_candidates(path: str | Path, dataset: Dataset, items: np.ndarray, scores: np.ndarray) -> None:
    ids = dataset.catalog.item_ids
    lines = [json.dumps({"user": dataset.user_ids[u], "items": [ids[i] for i in row],
                         "scores": [round(float(s), 6) for s in srow]})
             for u, (row, srow) in enumerate(zip(items, scores))]
    write_atomic(path, "\n".join(lines) + "\n")
