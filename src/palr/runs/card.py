"""The model card: a README.md in every run directory (data, protocol, configuration, metrics, how to load).

Written by :func:`palr.runs.finish_run` when a run completes and again when the run is evaluated on test
(``test_results.json``), so it always shows the figures the run holds. A LoRA adapter's README (peft's empty
template) is replaced by a pointer to this card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from palr.core.io import write_atomic
from palr.runs.safety import read_json

SKIP_METRICS = ("users",)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in SKIP_METRICS}


def _table(rows: dict[str, dict[str, float]]) -> list[str]:
    """A markdown table: one row per model, one column per metric (the union, in first-seen order)."""
    cols: list[str] = []
    for m in rows.values():
        cols += [c for c in m if c not in cols]
    if not cols:
        return []
    out = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in rows.items():
        cells = [f"{m[c]:.4f}" if isinstance(m.get(c), float) else str(m.get(c, "")) for c in cols]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def _comparison_line(metric: str, c: dict[str, Any]) -> str:
    def num(x: Any, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, int | float) else "n/a"

    lo, hi = c.get("diff_ci95") or [None, None]
    rlo, rhi = c.get("ratio_ci95") or [None, None]
    return (f"- {metric}: {num(c.get('mean_a'), '.4f')} vs {num(c.get('mean_b'), '.4f')}, difference "
            f"{num(c.get('diff'), '+.4f')} [{num(lo, '+.4f')}, {num(hi, '+.4f')}], ratio {num(c.get('ratio'), '.3f')}x "
            f"[{num(rlo, '.3f')}, {num(rhi, '.3f')}], p = {num(c.get('p_value'), '.3g')}")


def model_card(run: str | Path) -> str:
    """The card's markdown for a complete run directory."""
    run = Path(run)
    cfg = read_json(run / "config.json")
    metrics = read_json(run / "metrics.json") if (run / "metrics.json").exists() else {}
    test = read_json(run / "test_results.json") if (run / "test_results.json").exists() else None
    kind, ds, conf = cfg["kind"], cfg["dataset"], cfg["config"]
    if kind == "palr":
        ft = conf.get("finetune", {})
        title = (f"PALR ranker ({ft.get('base_model', '?')} LLM, {conf.get('ranking', {}).get('mode', '?')}) over "
                 f"the {conf.get('retriever', {}).get('retriever', '?')} retriever on {ds['name']}")
    else:
        title = f"{conf.get('retriever', '?')} retriever on {ds['name']}"
    lines = [f"# palr run: {title}", "",
             (f"A `{kind}` run written by palr {cfg.get('versions', {}).get('palr', '?')}. This card is generated "
              "from the run's `config.json`, `metrics.json` and, once the run is evaluated, `test_results.json`."), "",
             "## Data", "",
             (f"- data set: `{ds['name']}`: {ds['users']:,} users, {ds['items']:,} items, "
              f"{ds['interactions']:,} interactions after preprocessing"),
             (f"- fingerprint (sha256 of the preprocessed sequences and id maps): `{ds['fingerprint']}`; loading the "
              "run on other data is refused"),
             ("- the preprocessed data set is kept in the run (`data/`: sequences, ids, catalogue); later commands "
              "read it, never the raw files"),
             ("- the data set has its own licence (GroupLens terms, Amazon research use): share the run only where "
              "it allows"), "",
             "## Protocol", ""]
    lines += [f"- **{k}**: {v}" for k, v in cfg.get("protocol", {}).items()]
    lines += ["", "## Metrics", "", "Validation (the split used to choose epochs and the fusion weight):", ""]
    valid = _scalars(metrics.get("valid", {}))
    lines += _table({kind: valid}) if valid else ["(none recorded)"]
    lines += [""]
    if test:
        lines += ["Test (full ranking, leave-one-out; for PALR a target the retriever missed counts as a miss):", ""]
        if test.get("protocol", {}).get("ranked_by"):
            lines += [f"PALR ranked by: {test['protocol']['ranked_by']}.", ""]
        lines += _table({name: _scalars(r.get("test", {})) for name, r in test["results"].items()})
        for entry in (test.get("comparisons") or {}).values():
            lines += ["", (f"{entry['model']} against {entry['baseline']} on the same users (paired bootstrap 95% CIs, "
                      "paired t-test):"), ""]
            lines += [_comparison_line(m, c) for m, c in entry.get("test", {}).items() if m in ("HR@10", "NDCG@10")]
    else:
        lines += ["Test: not evaluated yet (`palr evaluate --run " + f"{run}` adds the figures here)."]
    lines += ["", "## Configuration", "", "```json", json.dumps(conf, indent=2, default=str), "```", "",
              "Library versions: " + ", ".join(f"{k} {v}" for k, v in cfg.get("versions", {}).items()), "",
              "## How to load", ""]
    if kind == "palr":
        lines += ["```python", "from palr.rank.pipeline import PALR", "",
                  f'palr = PALR.load("{run}")          # the run holds its data snapshot (data/)',
                  'rec = palr.recommend(user="<user id>", k=10, explain=True)   # or history=["<item id>", ...]',
                  "```", "",
                  (f"Command line: `palr recommend --run {run} --user ID --explain`, `palr serve --run {run}`, "
                   f"`palr report --run {run} --out report.html`.")]
    else:
        lines += ["```python", "from palr.retrieval.train import load_run", "",
                  f'config, retriever, split = load_run("{run}")', "scores = retriever.score(split.histories(\"test\"))",
                  "```", "", (f"Command line: `palr evaluate --run {run} --out results.json`, "
                              f"`palr finetune --run {run} --out PALR_RUN`.")]
    lines += ["", "## Files", "",
              "`run.json` (written last: the run is complete), `config.json`, `metrics.json`, `README.md` (this card), "
              "`data/` (the data snapshot)"
              + (", `ranking.json`, `llm/` or `adapter/` (the fine-tuned model), `retriever/`, `instructions.jsonl`"
                 if kind == "palr" else ", `model/` (the retriever's weights), `train.log`")
              + (", `test_results.json` + `test_ranks.npz` (per-user test ranks)" if test else "") + ".", ""]
    return "\n".join(lines)


def write_model_card(run: str | Path) -> Path:
    """Write ``README.md`` into a run directory (and point a LoRA adapter's README at it)."""
    run = Path(run)
    write_atomic(run / "README.md", model_card(run))
    adapter_readme = run / "adapter" / "README.md"
    if adapter_readme.exists():
        write_atomic(adapter_readme, "# LoRA adapter of a palr run\n\nSee the run's model card, `../README.md`: data, "
                     "protocol, configuration, metrics and how to load it.\n")
    return run / "README.md"


__all__ = ["model_card", "write_model_card"]
