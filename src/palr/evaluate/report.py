"""`palr report RUN [RUN ...] --out report.html`: one self-contained HTML file about one or more runs.

For each run: training curves (retriever and fine-tuning), the test metrics table with paired-bootstrap CIs
(PALR against its own retriever on the same users, from :mod:`palr.evaluate`), HR@K and NDCG@K over K, results
by history length and by target-item popularity, the candidate-recall ceiling, and example users. A PALR run's
test ranks come from ``test_ranks.npz`` (written by ``palr evaluate --run``; evaluated here when missing); a
retriever run is evaluated here (full ranking). Figures are SVG data URIs, the CSS is inline: no network.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from palr import __version__
from palr.core.io import write_atomic
from palr.core.metrics import metrics_from_ranks, per_user_metrics
from palr.data import Split
from palr.evaluate.palr import evaluate_palr_run
from palr.evaluate.plots import bucket_bars, metric_over_k, recall_ceiling, training_curves
from palr.evaluate.retrievers import evaluate_retriever
from palr.evaluate.stats import compare_metrics
from palr.rank.pipeline import PALR
from palr.retrieval.load import load_run
from palr.runs.safety import load_npz, read_json
from palr.runs.store import read_run

log = logging.getLogger(__name__)
TABLE_METRICS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20")
CURVE_KS = np.array([1, 2, 3, 5, 7, 10, 15, 20, 30, 50])


@dataclass
class RunData:
    """What the report shows of one run; ``ranks``: model name -> (U,) 1-based test ranks of the same users."""

    path: Path
    kind: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    split: Split
    ranks: dict[str, np.ndarray]
    users: np.ndarray
    n_candidates: int
    retriever_name: str
    retriever_history: list[dict[str, Any]] = field(default_factory=list)
    full_retriever_ranks: np.ndarray | None = None  # the retriever's full ranking (for Recall@N beyond K)
    examples: list[dict[str, Any]] = field(default_factory=list)
    ranked_by: str = ""  # what ordered PALR's lists ("trees + LLM"); empty for a retriever run

    @property
    def label(self) -> str:
        return self.path.name if self.path.name not in ("palr", "") else f"{self.path.parent.name}/{self.path.name}"


def _resolve(run: Path) -> Path:
    """A demo folder (holding ``palr/``) stands for its PALR run."""
    if not (run / "run.json").exists() and (run / "palr" / "run.json").exists():
        return run / "palr"
    return run


def load_run_data(run: str | Path, data_dir: str | Path | None = None, n_examples: int = 3) -> RunData:
    run = _resolve(Path(run))
    cfg = read_run(run)
    metrics = read_json(run / "metrics.json") if (run / "metrics.json").exists() else {}
    if cfg["kind"] == "palr":

        if not (run / "test_ranks.npz").exists():
            log.info("%s has no test evaluation yet: evaluating it now (written into the run)", run)
            evaluate_palr_run(run, data_dir=data_dir, progress=False)
        palr = PALR.load(run, data_dir)
        z = load_npz(run / "test_ranks.npz", ("users", "palr", "retriever"))
        name = cfg["config"]["retriever"]["retriever"]
        hist_file = run / "retriever" / "history.json"
        history = read_json(hist_file, list) if hist_file.exists() else []
        examples = [palr.recommend(user=u, k=5, explain=True).to_dict() | {"history": [
            palr.catalog.titles[int(i)] for i in palr.user_history(u)[-5:]]}
            for u in palr.split.dataset.user_ids[:n_examples]]
        return RunData(run, "palr", cfg, metrics, palr.split,
                       {f"{name} (retriever)": z["retriever"], "PALR (end to end)": z["palr"]}, z["users"],
                       int(palr.ranking["n_candidates"]), name, history, z["retriever"], examples,
                       palr.ranker.label)

    rcfg, model, split = load_run(run, data_dir)
    name = rcfg["config"]["retriever"]
    ev = evaluate_retriever(model, split, "test", candidates=50, progress=False)  # type: ignore[arg-type]
    ranks = np.asarray(ev["ranks"])
    return RunData(run, "retriever", cfg, metrics, split, {f"{name} (retriever)": ranks},
                   np.arange(len(ranks)), 50, name, list(metrics.get("history") or []), ranks)


# ---------------------------------------------------------------------------- tables
def _fmt_ci(lo: float, hi: float, digits: int = 4) -> str:
    return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]" if np.isfinite(lo) else "n/a"


def comparison_table(new: np.ndarray, base: np.ndarray, new_name: str, base_name: str, seed: int = 0) -> str:
    """The metrics table: both models' means, the difference and the ratio with 95% paired-bootstrap CIs, p."""
    cmp = compare_metrics(per_user_metrics(new), per_user_metrics(base), list(TABLE_METRICS), seed=seed)
    rows = []
    for m, c in cmp.items():
        lo, hi = c.ratio_ci95
        ratio = f"{c.ratio:.3f}x [{lo:.3f}, {hi:.3f}]" if np.isfinite(c.ratio) else "n/a"
        rows.append(f"<tr><td>{m}</td><td class=num>{c.mean_b:.4f}</td><td class=num>{c.mean_a:.4f}</td>"
                    f"<td class=num>{c.diff:+.4f} {_fmt_ci(*c.diff_ci95)}</td><td class=num>{ratio}</td>"
                    f"<td class=num>{c.p_value:.3g}</td></tr>")
    n = len(new)
    return (f"<table class=metrics><thead><tr><th>metric (test, {n:,} users)</th><th>{html.escape(base_name)}</th>"
            f"<th>{html.escape(new_name)}</th><th>difference [95% CI]</th><th>ratio [95% CI]</th><th>p</th></tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


def _buckets(values: np.ndarray, n: int = 4) -> tuple[list[str], np.ndarray]:
    """Quantile buckets of integer ``values``: labels and each value's bucket index."""
    edges = np.unique(np.quantile(values, np.linspace(0, 1, n + 1)[1:-1]).round().astype(int))
    idx = np.searchsorted(edges, values, side="left")
    bounds = [int(values.min())] + [int(e) + 1 for e in edges]
    tops = [int(e) for e in edges] + [int(values.max())]
    labels = [f"{lo}-{hi}" if lo != hi else f"{lo}" for lo, hi in zip(bounds, tops)]
    return labels, idx


def segment_section(rd: RunData, values: np.ndarray, what: str, note: str) -> str:
    """NDCG@10 per bucket for every model (a figure) and PALR against the retriever per bucket (a table)."""

    labels, idx = _buckets(values)
    keep = [b for b in range(len(labels)) if (idx == b).any()]
    per = {name: [metrics_from_ranks(r[idx == b], [10])["NDCG@10"] for b in keep] for name, r in rd.ranks.items()}
    counts = [int((idx == b).sum()) for b in keep]
    fig = bucket_bars([labels[b] for b in keep], per, counts, what)
    rows = ""
    if len(rd.ranks) == 2:
        base, new = rd.ranks.values()
        for b, lab, cnt in zip(keep, [labels[b] for b in keep], counts):
            c = compare_metrics(per_user_metrics(new[idx == b], [10]), per_user_metrics(base[idx == b], [10]),
                                ["NDCG@10"])["NDCG@10"]
            rows += (f"<tr><td>{lab}</td><td class=num>{cnt}</td><td class=num>{c.mean_b:.4f}</td>"
                     f"<td class=num>{c.mean_a:.4f}</td><td class=num>{c.diff:+.4f} {_fmt_ci(*c.diff_ci95)}</td></tr>")
        names = [html.escape(n) for n in rd.ranks]
        rows = (f"<table class=segments><thead><tr><th>{html.escape(what)}</th><th>users</th><th>{names[0]}</th>"
                f"<th>{names[1]}</th><th>difference [95% CI]</th></tr></thead><tbody>{rows}</tbody></table>")
    return f"<figure>{fig}<figcaption>{html.escape(note)}</figcaption></figure>{rows}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def examples_section(rd: RunData) -> str:
    out = []
    for ex in rd.examples:
        items = "".join(f"<li><b>{html.escape(it['title'])}</b> <span class=muted>(score {_num(it.get('score'))}, "
                        f"{html.escape(rd.retriever_name)} rank {it.get('retriever_rank') or '-'})</span>"
                        f"<div class=why>{html.escape(it.get('explanation') or '')}</div></li>" for it in ex["items"])
        seen = ", ".join(html.escape(t) for t in ex["history"])
        out.append(f"<div class=example><h4>user {html.escape(str(ex['user']))}</h4>"
                   f"<p><span class=label>profile</span> {html.escape(ex['profile'])}</p>"
                   f"<p><span class=label>latest in history</span> {seen}</p><ol>{items}</ol></div>")
    return "<div class=examples>" + "".join(out) + "</div>" if out else ""


def settings_line(rd: RunData) -> str:
    """The run's main settings in one line (the model card has them all)."""
    conf = rd.config["config"]
    if rd.kind == "palr":
        rk, ft = conf.get("ranking", {}), conf.get("finetune", {})
        bits = [f"retriever {rd.retriever_name}", f"LLM {ft.get('base_model', '?')}"
                + (f" + LoRA r={ft.get('lora_r')}" if rk.get("lora") else ""),
                f"{rk.get('mode', '?')} ranking of the top {rk.get('n_candidates', '?')}",
                f"fusion {rk.get('fusion', 'rank')} weight {rk.get('weight', '?')} (chosen on validation)",
                f"{ft.get('epochs', '?')} fine-tuning epoch(s) on {rd.metrics.get('train_contexts', '?'):,} contexts"
                if isinstance(rd.metrics.get("train_contexts"), int) else f"{ft.get('epochs', '?')} fine-tuning epoch(s)",
                f"seed {ft.get('seed', '?')}"]
    else:
        params = conf.get("params", {})
        bits = [f"retriever {rd.retriever_name}"] + [f"{k} {v}" for k, v in list(params.items())[:8]]
    return html.escape(" · ".join(bits))


# ---------------------------------------------------------------------------- the page
def run_section(rd: RunData, seed: int = 0) -> tuple[str, int]:
    """One run's HTML and the number of figures in it."""

    ds = rd.config["dataset"]
    parts = [f"<section><h2>{html.escape(rd.label)}: {html.escape(rd.kind)} run on {html.escape(ds['name'])}</h2>",
             (f"<p class=muted>{html.escape(str(rd.path))} &middot; {ds['users']:,} users, {ds['items']:,} items, "
              f"{ds['interactions']:,} interactions &middot; fingerprint {ds['fingerprint'][:12]}</p>")]
    parts.append(f"<p class=settings>{settings_line(rd)}</p>")
    figures = 0
    names = list(rd.ranks)
    parts.append("<h3>Test metrics</h3>")
    if len(names) == 2:
        new_name = f"{names[1]}, ranked by {rd.ranked_by}" if rd.ranked_by else names[1]
        parts.append(comparison_table(rd.ranks[names[1]], rd.ranks[names[0]], new_name, names[0], seed))
        parts.append("<p class=note>Full ranking, leave-one-out; PALR end to end counts a target its retriever did "
                     "not return as a miss. Intervals: paired bootstrap over users (2,000 resamples); p: paired "
                     "t-test on per-user differences.</p>")
    else:
        m = metrics_from_ranks(rd.ranks[names[0]])
        parts.append("<table class=metrics><thead><tr><th>metric</th><th>" + html.escape(names[0]) +
                     "</th></tr></thead><tbody>" + "".join(f"<tr><td>{k}</td><td class=num>{m[k]:.4f}</td></tr>"
                                                          for k in TABLE_METRICS) + "</tbody></table>")
    curves = training_curves(rd.retriever_history, rd.metrics if rd.kind == "palr" else {})
    if curves:
        parts.append(f"<h3>Training curves</h3><figure>{curves}<figcaption>Retriever: mean training loss and "
                     "validation NDCG@10 per epoch (the best epoch is kept). LLM: loss per fine-tuning batch and the "
                     "fused validation NDCG@10 after each epoch.</figcaption></figure>")
        figures += 1
    over_k = {n: {"HR": np.array([(r <= k).mean() for k in CURVE_KS]),
                  "NDCG": np.array([metrics_from_ranks(r, [int(k)])[f"NDCG@{k}"] for k in CURVE_KS])}
              for n, r in rd.ranks.items()}
    parts.append(f"<h3>HR@K and NDCG@K over K</h3><figure>{metric_over_k(over_k, CURVE_KS)}</figure>")
    figures += 1
    full = rd.full_retriever_ranks if rd.full_retriever_ranks is not None else rd.ranks[names[0]]
    ns = np.unique(np.geomspace(1, max(4 * rd.n_candidates, 200), 60).astype(int))
    rec = np.array([(full <= n).mean() for n in ns])
    n_cand = rd.n_candidates
    ceiling = float((full <= n_cand).mean())
    parts.append(f"<h3>Candidate-recall ceiling</h3><figure>{recall_ceiling({rd.retriever_name: (ns, rec, n_cand, ceiling)})}"
                 f"<figcaption>PALR re-ranks the retriever's top {n_cand}: no ranking can reach HR above "
                 f"Recall@{n_cand} = {ceiling:.4f} here.</figcaption></figure>")
    figures += 1
    hist_len = np.array([len(rd.split.histories("test")[u]) for u in rd.users])
    pop = np.bincount(np.concatenate(rd.split.train), minlength=rd.split.n_items)
    target_pop = pop[rd.split.targets("test")[rd.users]]
    parts.append("<h3>By history length</h3>" + segment_section(
        rd, hist_len, "history length (items)", "Users in quartiles of their history length at test time."))
    parts.append("<h3>By item popularity</h3>" + segment_section(
        rd, target_pop, "test item's training interactions", "Users in quartiles of how popular their test item "
        "is (interactions in the training split): where does the LLM help, on the head or the tail?"))
    figures += 2
    if rd.examples:
        parts.append("<h3>Example users</h3>" + examples_section(rd))
    parts.append("</section>")
    return "".join(parts), figures


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;max-width:1100px;
margin:0 auto;padding:1.2rem 1.5rem;background:#fff}
h1{color:#2f5bd3;margin:.2rem 0}h2{border-bottom:2px solid #e3e6ec;padding-bottom:.3rem;margin-top:2rem}
h3{margin:1.4rem 0 .5rem}table{border-collapse:collapse;margin:.4rem 0}th,td{padding:.3rem .6rem;
border-bottom:1px solid #e3e6ec;text-align:left}th{font-size:.8rem;color:#667085}td.num{text-align:right;
font-variant-numeric:tabular-nums;white-space:nowrap}figure{margin:.5rem 0}figure img{max-width:100%}
figcaption,.note,.muted{color:#667085;font-size:.85rem}.label{font-size:.72rem;text-transform:uppercase;
letter-spacing:.05em;color:#667085;margin-right:.4rem}.examples{display:grid;grid-template-columns:repeat(auto-fit,
minmax(320px,1fr));gap:1rem}.example{border:1px solid #e3e6ec;border-radius:8px;padding:.2rem .9rem}
.example h4{margin:.6rem 0 .2rem}.why{color:#667085;font-size:.85rem}.settings{font-size:.88rem}
"""


def cross_run_section(runs: list[RunData], seed: int = 0) -> str:
    """PALR of each later run against the first run's, where the runs share a data set and users."""
    if len(runs) < 2:
        return ""
    first = runs[0]
    out = []
    for rd in runs[1:]:
        same = (rd.config["dataset"]["fingerprint"] == first.config["dataset"]["fingerprint"]
                and np.array_equal(rd.users, first.users))
        if same:
            a, b = list(rd.ranks.values())[-1], list(first.ranks.values())[-1]
            out.append(f"<h3>{html.escape(rd.label)} against {html.escape(first.label)}</h3>" +
                       comparison_table(a, b, f"{rd.label}: {list(rd.ranks)[-1]}", f"{first.label}: "
                                        f"{list(first.ranks)[-1]}", seed))
    return "<section><h2>Runs compared</h2>" + "".join(out) + "</section>" if out else ""


def write_report(runs: list[str | Path], out: str | Path, data_dir: str | Path | None = None, n_examples: int = 3,
                 seed: int = 0) -> Path:
    """Write the report for ``runs`` to ``out`` (atomic) and return its path."""

    data = [load_run_data(r, data_dir, n_examples) for r in runs]
    sections, figures = [], 0
    for rd in data:
        html_part, n = run_section(rd, seed)
        sections.append(html_part)
        figures += n
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    protocol = data[0].config.get("protocol", {})
    proto = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in protocol.items())
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>palr report</title>"
            f"<style>{CSS}</style></head><body><h1>palr report</h1>"
            f"<p class=muted>{len(data)} run(s), {figures} figures; written {when} by palr {__version__}</p>"
            + "".join(sections) + cross_run_section(data, seed) +
            f"<section><h2>Protocol</h2><ul>{proto}</ul></section></body></html>")
    out = Path(out)
    write_atomic(out, page)
    return out


__all__ = ["RunData", "comparison_table", "load_run_data", "write_report"]
