"""The report's figures (matplotlib, rendered to SVG and embedded as data URIs: the HTML needs no network).

Each function takes plain numbers and returns an ``<img>`` tag; :mod:`palr.evaluate.report` decides what to plot.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

COLORS = ["#2f5bd3", "#d3562f", "#2f9e6e", "#8d4fc2", "#c79a1a", "#5d6b82"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "palr", "font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 100})
    return plt


def to_img(fig: Any, alt: str) -> str:
    """The figure as an inline SVG ``<img>`` (the figure is closed)."""
    plt = _plt()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    data = base64.b64encode(buf.getvalue().encode()).decode()
    return f'<img alt="{alt}" src="data:image/svg+xml;base64,{data}">'


def training_curves(retriever: Sequence[dict[str, Any]], finetune: dict[str, Any], title: str = "") -> str | None:
    """Left: the retriever's loss and validation NDCG@10 per epoch; right: fine-tuning loss per batch (and the
    item-token pretraining loss per epoch), validation NDCG@10 per epoch. None when nothing was recorded."""
    steps = finetune.get("train_loss_steps") or []
    curve = finetune.get("curve") or []
    if not retriever and not steps and not curve:
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    if retriever:
        ep = [h["epoch"] for h in retriever]
        a.plot(ep, [h["loss"] for h in retriever], "-o", ms=3, color=COLORS[0], label="training loss")
        a.set_xlabel("retriever epoch")
        a.set_ylabel("loss", color=COLORS[0])
        a2 = a.twinx()
        ev = [h for h in retriever if "valid_NDCG@10" in h]
        a2.plot([h["epoch"] for h in ev], [h["valid_NDCG@10"] for h in ev], "-s", ms=3, color=COLORS[1])
        # early stopping may track a smoothed curve: the kept epoch is the best of what it tracked
        key = "valid_NDCG@10_smoothed" if any("valid_NDCG@10_smoothed" in h for h in ev) else "valid_NDCG@10"
        if key != "valid_NDCG@10":
            a2.plot([h["epoch"] for h in ev], [h[key] for h in ev], ":", lw=1, color=COLORS[1])
        a2.set_ylabel("valid NDCG@10" + (" (dotted: smoothed)" if key != "valid_NDCG@10" else ""), color=COLORS[1])
        a2.grid(False)
        best = max(ev, key=lambda h: h[key]) if ev else None
        if best:
            a2.annotate(f"kept: epoch {best['epoch']}", (best["epoch"], best["valid_NDCG@10"]), fontsize=8,
                        xytext=(0, -14), textcoords="offset points", ha="center")
        a.set_title("retriever")
    else:
        a.text(0.5, 0.5, "no per-epoch history\n(this retriever is not trained by epochs)", ha="center",
               va="center", transform=a.transAxes)
        a.set_title("retriever")
    if steps:
        x = np.asarray(steps, dtype=float)
        b.plot(x[:, 0], x[:, 1], color=COLORS[0], lw=0.6, alpha=0.45)
        w = max(1, len(x) // 15)
        smooth = np.convolve(x[:, 1], np.ones(w) / w, mode="valid")
        b.plot(x[w - 1:, 0], smooth, color=COLORS[0], lw=1.6, label=f"loss (moving mean of {w})")
        b.set_xlabel("fine-tuning batch")
        b.set_ylabel("loss", color=COLORS[0])
    if curve:
        b2 = b.twinx()
        xs = np.cumsum([c["batches"] for c in curve])
        fused = [c.get("valid_ndcg@10", np.nan) for c in curve]
        alone = [c.get("valid_ndcg@10_retriever", np.nan) for c in curve]
        b2.plot(xs, fused, "-s", ms=5, color=COLORS[1], label=f"valid NDCG@10, fused (last {fused[-1]:.4f})")
        b2.plot(xs, alone, ":x", ms=6, color=COLORS[5], label=f"valid NDCG@10, retriever alone ({alone[-1]:.4f})")
        lo, hi = np.nanmin(fused + alone), np.nanmax(fused + alone)
        pad = max(0.1 * (hi - lo), 0.02 * hi, 1e-4)
        b2.set_ylim(lo - 4 * pad, hi + pad)
        b2.set_ylabel("valid NDCG@10", color=COLORS[1])
        b2.grid(False)
        b2.legend(loc="lower left", fontsize=7, frameon=False)
    pre = finetune.get("pretrain_losses") or []
    title_b = "LLM fine-tuning"
    if pre:
        title_b += " (item-token pretraining loss per epoch: " + ", ".join(f"{v:.2f}" for v in pre) + ")"
    b.set_title(title_b, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return to_img(fig, f"training curves {title}".strip())


def metric_over_k(curves: dict[str, dict[str, np.ndarray]], ks: np.ndarray) -> str:
    """HR@K and NDCG@K for K = ks, one line per model."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for j, (name, c) in enumerate(curves.items()):
        style = "-" if "PALR" in name else "--"
        for ax, m in zip(axes, ("HR", "NDCG")):
            ax.plot(ks, c[m], style, color=COLORS[j % len(COLORS)], label=name, lw=1.4)
    for ax, m in zip(axes, ("HR", "NDCG")):
        ax.set_xlabel("K")
        ax.set_ylabel(f"{m}@K (test)")
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 5, 10, 20, 50])
        ax.set_xticklabels(["1", "2", "5", "10", "20", "50"])
    axes[0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return to_img(fig, "HR@K and NDCG@K over K")


def recall_ceiling(recalls: dict[str, tuple[np.ndarray, np.ndarray, int, float]]) -> str:
    """The retriever's Recall@N over N; the candidate count marks PALR's ceiling (it only reorders those).
    ``recalls``: name -> (N values, Recall@N, candidate count, Recall@candidate count)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for j, (name, (ns, rec, n_cand, at)) in enumerate(recalls.items()):
        color = COLORS[j % len(COLORS)]
        ax.plot(ns, rec, color=color, label=name)
        ax.plot([n_cand], [at], "o", color=color, ms=4)
        ax.axvline(n_cand, color=color, ls=":", lw=1)
        ax.annotate(f"ceiling {at:.3f} at N = {n_cand}", (n_cand, at), xytext=(6, -12), textcoords="offset points",
                    fontsize=8, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("N (retriever candidates)")
    ax.set_ylabel("Recall@N (test target retrieved)")
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    fig.tight_layout()
    return to_img(fig, "candidate recall ceiling")


def bucket_bars(labels: Sequence[str], values: dict[str, Sequence[float]], counts: Sequence[int], xlabel: str,
                metric: str = "NDCG@10") -> str:
    """Grouped bars: ``metric`` per bucket, one bar per model; user counts under the labels."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    n = len(values)
    width = 0.8 / max(n, 1)
    x = np.arange(len(labels))
    for j, (name, v) in enumerate(values.items()):
        ax.bar(x + (j - (n - 1) / 2) * width, v, width, color=COLORS[j % len(COLORS)], label=name)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{lab}\n({c} users)" for lab, c in zip(labels, counts)], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (test)")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return to_img(fig, f"{metric} by {xlabel}")


__all__ = ["bucket_bars", "metric_over_k", "recall_ceiling", "to_img", "training_curves"]
