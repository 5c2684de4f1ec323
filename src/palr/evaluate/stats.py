"""Statistics over users: paired bootstrap CIs of a difference and a ratio, a paired test, seed summaries.

Two models compared on the same users give two per-user metric vectors ``a`` (the new model) and ``b``
(the baseline). :func:`paired_bootstrap` resamples *users* (with replacement, the same users for both
models: a paired bootstrap), giving percentile intervals for ``mean(a) - mean(b)`` and ``mean(a) / mean(b)``.
The p-value is the two-sided paired t-test on the per-user differences (H0: mean difference 0); with
thousands of users it is the usual large-sample test, and for 0/1 metrics (HR) it agrees closely with
McNemar's test. It is exact and smooth, where a bootstrap p-value is limited to 1/n_boot.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

P_VALUE_TEST = "two-sided paired t-test on per-user differences"
CI_METHOD = "paired bootstrap over users, percentile interval"
_CHUNK_ELEMENTS = 4_000_000  # resampled (replicate, user) cells held at once


@dataclass(frozen=True)
class Comparison:
    """Model A (new) against model B (baseline) on the same users, for one metric.

    ``diff = mean_a - mean_b``, ``ratio = mean_a / mean_b`` (NaN when mean_b is 0); the ``*_ci95`` are the
    paired-bootstrap percentile intervals (at the level asked, 95% by default); ``p_value`` is the
    two-sided paired t-test (NaN with fewer than 2 users).
    """

    mean_a: float
    mean_b: float
    diff: float
    diff_ci95: tuple[float, float]
    ratio: float
    ratio_ci95: tuple[float, float]
    p_value: float
    n_users: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists, NaN becomes None."""
        def clean(x: Any) -> Any:
            if isinstance(x, tuple):
                return [clean(v) for v in x]
            if isinstance(x, float) and not math.isfinite(x):
                return None
            return x

        return {k: clean(v) for k, v in asdict(self).items()}

    def significant(self, alpha: float = 0.05) -> bool:
        return math.isfinite(self.p_value) and self.p_value < alpha


def _resample_weights(n_users: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of (c, U) float64 counts: how often each user is drawn in each bootstrap replicate."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CHUNK_ELEMENTS // max(n_users, 1)))
    for start in range(0, n_boot, chunk):
        c = min(chunk, n_boot - start)
        idx = rng.integers(0, n_users, size=(c, n_users))  # (c, U)
        idx += (np.arange(c) * n_users)[:, None]
        yield np.bincount(idx.ravel(), minlength=c * n_users).reshape(c, n_users).astype(np.float64)


def _paired_t_p(d: np.ndarray) -> float:
    n = len(d)
    if n < 2:
        return math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    from scipy import stats

    t = mean / (sd / math.sqrt(n))
    return float(2.0 * stats.t.sf(abs(t), df=n - 1))


def _interval(x: np.ndarray, alpha: float) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if not len(x):
        return (math.nan, math.nan)
    lo, hi = np.quantile(x, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def compare_metrics(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], metrics: Sequence[str] | None = None,
                    *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, Comparison]:
    """:func:`paired_bootstrap` for several metrics of the same users at once (the same resamples for all,
    so each result equals ``paired_bootstrap(a[m], b[m], ...)``)."""
    names = list(metrics) if metrics is not None else [m for m in a if m in b]
    if not names:
        return {}
    A = np.stack([np.asarray(a[m], dtype=np.float64) for m in names])  # (M, U)
    B = np.stack([np.asarray(b[m], dtype=np.float64) for m in names])  # (M, U)
    if A.shape != B.shape:
        raise ValueError(f"paired comparison needs the same users: {A.shape[1]} vs {B.shape[1]}")
    n = A.shape[1]
    if n == 0:
        raise ValueError("paired comparison of zero users")
    mean_a, mean_b = A.mean(axis=1), B.mean(axis=1)  # (M,)
    boot_a, boot_b = [], []
    for w in _resample_weights(n, n_boot, seed):  # (c, U)
        boot_a.append(w @ A.T / n)  # (c, M)
        boot_b.append(w @ B.T / n)
    ba, bb = np.concatenate(boot_a), np.concatenate(boot_b)  # (n_boot, M)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot_ratio = np.where(bb > 0, ba / bb, np.nan)
    out: dict[str, Comparison] = {}
    for j, m in enumerate(names):
        ma, mb = float(mean_a[j]), float(mean_b[j])
        ratio = ma / mb if mb > 0 else math.nan
        out[m] = Comparison(
            mean_a=ma, mean_b=mb, diff=ma - mb, diff_ci95=_interval(ba[:, j] - bb[:, j], alpha),
            ratio=ratio, ratio_ci95=_interval(boot_ratio[:, j], alpha) if mb > 0 else (math.nan, math.nan),
            p_value=_paired_t_p(A[j] - B[j]), n_users=n)
    return out


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, seed: int = 0,
                     alpha: float = 0.05) -> Comparison:
    """Compare per-user metric ``a`` (new model) with ``b`` (baseline), same users in the same order.

    Users are resampled with replacement ``n_boot`` times (numpy Generator seeded with ``seed``); the
    interval of the difference and of the ratio of the means are the ``alpha/2`` and ``1 - alpha/2``
    percentiles of the replicates (replicates with a zero baseline mean are left out of the ratio's).
    The p-value is the two-sided paired t-test on ``a - b``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired_bootstrap needs two 1-D arrays over the same users, got {a.shape} and {b.shape}")
    return compare_metrics({"m": a}, {"m": b}, n_boot=n_boot, seed=seed, alpha=alpha)["m"]


def summarize_seeds(values: Sequence[float]) -> dict[str, float | int]:
    """{"mean", "sd", "n"} of one figure over seeds; sd is the sample standard deviation (ddof=1), 0.0 for n=1."""
    x = np.asarray(list(values), dtype=np.float64)
    if not len(x):
        raise ValueError("summarize_seeds needs at least one value")
    return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else 0.0, "n": len(x)}


def format_ratio(c: Comparison, digits: int = 3) -> str:
    """'1.025x [0.981, 1.071]' (or 'n/a' when the baseline is 0)."""
    if not math.isfinite(c.ratio):
        return "n/a"
    lo, hi = c.ratio_ci95
    return f"{c.ratio:.{digits}f}x [{lo:.{digits}f}, {hi:.{digits}f}]"
