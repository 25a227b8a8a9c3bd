"""Evaluation maths: discrimination, the operating point, calibration, with intervals.

Every figure that a decision rests on comes with a 95% interval, because the test sets
here are small (tens of patients per source): ROC AUC with DeLong's variance, proportions
(sensitivity, specificity, PPV, NPV, accuracy) with Wilson score intervals, F1 with a
percentile bootstrap.  A score ``p >= threshold`` is called positive everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm

Z95 = 1.959963984540054
DEFAULT_TABLE_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _arrays(y: ArrayLike, p: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    ya = np.asarray(y, dtype=np.int64).ravel()
    pa = np.asarray(p, dtype=np.float64).ravel()
    if ya.shape != pa.shape:
        raise ValueError(f"labels ({ya.size}) and scores ({pa.size}) differ in length")
    if ya.size and not np.isin(ya, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return ya, pa


def both_classes(y: ArrayLike) -> bool:
    ya = np.asarray(y)
    return bool((ya == 1).any() and (ya == 0).any())


def wilson(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None, float | None]:
    """Proportion k/n with its Wilson score interval; None where n is zero."""
    if n <= 0:
        return None, None, None
    phat = k / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return phat, max(0.0, centre - half), min(1.0, centre + half)


def _midranks(x: NDArray[np.float64]) -> NDArray[np.float64]:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    ranks = np.zeros(n, dtype=np.float64)
    i = 0
    while i < n:
        j = i
        while j < n and xs[j] == xs[i]:
            j += 1
        ranks[i:j] = 0.5 * (i + j - 1) + 1
        i = j
    out = np.empty(n, dtype=np.float64)
    out[order] = ranks
    return out


def _delong_components(
    y: NDArray[np.int64], scores: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """AUCs and structural components (Sun & Xu's fast DeLong) for k score rows."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    k = scores.shape[0]
    aucs = np.empty(k)
    v10 = np.empty((k, m))
    v01 = np.empty((k, n))
    for r in range(k):
        tx, ty = _midranks(pos[r]), _midranks(neg[r])
        tz = _midranks(np.concatenate([pos[r], neg[r]]))
        aucs[r] = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        v10[r] = (tz[:m] - tx) / n
        v01[r] = 1.0 - (tz[m:] - ty) / m
    return aucs, v10, v01


def roc_auc(y: ArrayLike, p: ArrayLike) -> float | None:
    ya, pa = _arrays(y, p)
    if not both_classes(ya):
        return None
    aucs, _, _ = _delong_components(ya, pa[None, :])
    return float(aucs[0])


def delong_ci(
    y: ArrayLike, p: ArrayLike, z: float = Z95
) -> tuple[float | None, list[float] | None]:
    """ROC AUC with DeLong's 95% interval (clipped to [0, 1])."""
    ya, pa = _arrays(y, p)
    if not both_classes(ya):
        return None, None
    aucs, v10, v01 = _delong_components(ya, pa[None, :])
    m, n = v10.shape[1], v01.shape[1]
    var = (np.var(v10[0], ddof=1) / m if m > 1 else 0.0) + (
        np.var(v01[0], ddof=1) / n if n > 1 else 0.0
    )
    half = z * math.sqrt(max(float(var), 0.0))
    auc = float(aucs[0])
    return auc, [max(0.0, auc - half), min(1.0, auc + half)]


def delong_paired(y: ArrayLike, p1: ArrayLike, p2: ArrayLike) -> dict[str, float | None]:
    """Two models on the same cases: AUC difference (2 - 1), its 95% CI and p-value."""
    ya, a = _arrays(y, p1)
    _, b = _arrays(y, p2)
    if not both_classes(ya):
        return {"auc_1": None, "auc_2": None, "diff": None, "ci_low": None, "ci_high": None,
                "p_value": None}
    aucs, v10, v01 = _delong_components(ya, np.vstack([a, b]))
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.cov(v10) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(v01) if n > 1 else np.zeros((2, 2))
    cov = s10 / m + s01 / n
    diff = float(aucs[1] - aucs[0])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    sd = math.sqrt(max(var, 0.0))
    pval = float(2 * norm.sf(abs(diff) / sd)) if sd > 0 else (1.0 if diff == 0 else 0.0)
    return {"auc_1": float(aucs[0]), "auc_2": float(aucs[1]), "diff": diff,
            "ci_low": diff - Z95 * sd, "ci_high": diff + Z95 * sd, "p_value": pval}


def _binary_counts(
    ya: NDArray[np.int64], pa: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """True and false positives at each distinct score, highest first (``p >= t``)."""
    order = np.argsort(-pa, kind="mergesort")
    ys, ps = ya[order], pa[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ps)), ys.size - 1]
    tps = np.cumsum(ys, dtype=np.float64)[last_of_tie]
    fps = (last_of_tie + 1).astype(np.float64) - tps
    return fps, tps, ps[last_of_tie]


def roc_points(y: ArrayLike, p: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """False and true positive rates from (0, 0) to (1, 1), collinear points dropped."""
    ya, pa = _arrays(y, p)
    if not both_classes(ya):
        raise ValueError("an ROC curve needs both classes")
    fps, tps, _ = _binary_counts(ya, pa)
    if fps.size > 2:  # keep only the corners of the staircase
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1]


def pr_points(y: ArrayLike, p: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Precision and recall from the lowest threshold up, ending at (1, 0)."""
    ya, pa = _arrays(y, p)
    if not (ya == 1).any():
        raise ValueError("a precision-recall curve needs positives")
    fps, tps, _ = _binary_counts(ya, pa)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]


def pr_auc(y: ArrayLike, p: ArrayLike) -> float | None:
    """Area under the precision-recall curve (average precision, step-wise, no interpolation)."""
    ya, pa = _arrays(y, p)
    if not both_classes(ya):
        return None
    precision, recall = pr_points(ya, pa)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def threshold_for_sensitivity(y: ArrayLike, p: ArrayLike, target: float) -> float:
    """The highest threshold whose sensitivity on these cases is at least ``target``.

    With k = ceil(target * positives), it is the k-th highest positive score, so at
    least k positives score at or above it.  Chosen on validation patients only.
    """
    ya, pa = _arrays(y, p)
    pos = np.sort(pa[ya == 1])[::-1]
    if pos.size == 0:
        raise ValueError("no positive cases to choose a threshold on")
    k = max(1, math.ceil(target * pos.size - 1e-9))
    return float(pos[min(k, pos.size) - 1])


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn}


def confusion(y: ArrayLike, p: ArrayLike, threshold: float) -> Confusion:
    ya, pa = _arrays(y, p)
    pred = pa >= threshold
    return Confusion(
        tp=int(((ya == 1) & pred).sum()), fp=int(((ya == 0) & pred).sum()),
        tn=int(((ya == 0) & ~pred).sum()), fn=int(((ya == 1) & ~pred).sum()),
    )


def _f1(c: Confusion) -> float | None:
    d = 2 * c.tp + c.fp + c.fn
    return None if d == 0 else 2 * c.tp / d


def _bootstrap_f1(ya: NDArray[np.int64], pred: NDArray[np.bool_], reps: int = 1000,
                  seed: int = 0) -> list[float] | None:
    if ya.size == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, ya.size, size=(reps, ya.size))
    yy, pp = ya[idx] == 1, pred[idx]
    tp = (yy & pp).sum(1)
    fp = (~yy & pp).sum(1)
    fn = (yy & ~pp).sum(1)
    d = 2 * tp + fp + fn
    f1 = np.where(d > 0, 2 * tp / np.maximum(d, 1), np.nan)
    f1 = f1[~np.isnan(f1)]
    if f1.size == 0:
        return None
    return [float(np.percentile(f1, 2.5)), float(np.percentile(f1, 97.5))]


def operating_point(y: ArrayLike, p: ArrayLike, threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV, accuracy (Wilson CIs), F1 (bootstrap CI)."""
    ya, pa = _arrays(y, p)
    c = confusion(ya, pa, threshold)
    out: dict[str, Any] = {"threshold": float(threshold), "confusion": c.as_dict(), "n": c.n}
    for name, k, n in (
        ("sensitivity", c.tp, c.tp + c.fn),
        ("specificity", c.tn, c.tn + c.fp),
        ("ppv", c.tp, c.tp + c.fp),
        ("npv", c.tn, c.tn + c.fn),
        ("accuracy", c.tp + c.tn, c.n),
    ):
        value, lo, hi = wilson(k, n)
        out[name] = value
        out[f"{name}_ci"] = None if lo is None else [lo, hi]
    out["f1"] = _f1(c)
    out["f1_ci"] = _bootstrap_f1(ya, pa >= threshold)
    out["positive_rate"] = (c.tp + c.fp) / c.n if c.n else None
    return out


def threshold_table(y: ArrayLike, p: ArrayLike,
                    thresholds: Sequence[float] = DEFAULT_TABLE_THRESHOLDS) -> list[dict[str, Any]]:
    """Sensitivity and specificity at several thresholds (as in Deep-COVID's tables)."""
    ya, pa = _arrays(y, p)
    rows = []
    for t in thresholds:
        c = confusion(ya, pa, t)
        sens = wilson(c.tp, c.tp + c.fn)
        spec = wilson(c.tn, c.tn + c.fp)
        rows.append({"threshold": float(t), "sensitivity": sens[0],
                     "sensitivity_ci": None if sens[1] is None else [sens[1], sens[2]],
                     "specificity": spec[0],
                     "specificity_ci": None if spec[1] is None else [spec[1], spec[2]]})
    return rows


def brier(y: ArrayLike, p: ArrayLike) -> float | None:
    ya, pa = _arrays(y, p)
    return None if ya.size == 0 else float(np.mean((pa - ya) ** 2))


def reliability_curve(y: ArrayLike, p: ArrayLike, bins: int = 10) -> list[dict[str, Any]]:
    """Mean score vs observed positive fraction in equal-width score bins (empty bins left out)."""
    ya, pa = _arrays(y, p)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(pa, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            out.append({"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]),
                        "mean_score": float(pa[mask].mean()),
                        "fraction_positive": float(ya[mask].mean()), "n": int(mask.sum())})
    return out


def curves(y: ArrayLike, p: ArrayLike) -> dict[str, list[float]] | None:
    """ROC and PR curve points, for plots."""
    ya, pa = _arrays(y, p)
    if not both_classes(ya):
        return None
    fpr, tpr = roc_points(ya, pa)
    prec, rec = pr_points(ya, pa)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "precision": prec.tolist(),
            "recall": rec.tolist()}


def evaluate_scores(y: ArrayLike, p: ArrayLike, threshold: float, *,
                    groups: Sequence[str] | None = None,
                    target_sensitivity: float | None = None,
                    with_groups: bool = True) -> dict[str, Any]:
    """Every figure for one set of scored cases, and again per group (source or site)."""
    ya, pa = _arrays(y, p)
    auc, auc_ci = delong_ci(ya, pa)
    out: dict[str, Any] = {
        "n": int(ya.size), "n_positive": int((ya == 1).sum()),
        "n_negative": int((ya == 0).sum()),
        "auc": auc, "auc_ci": auc_ci, "pr_auc": pr_auc(ya, pa),
    }
    out.update(operating_point(ya, pa, threshold))
    out["threshold_table"] = threshold_table(ya, pa)
    out["brier"] = brier(ya, pa)
    out["reliability"] = reliability_curve(ya, pa)
    if target_sensitivity is not None and (ya == 1).any():
        # what this model would need on these cases: shows threshold drift, never used
        # to pick the operating threshold on a test set
        out["threshold_for_target_here"] = threshold_for_sensitivity(ya, pa, target_sensitivity)
    if groups is not None and with_groups:
        ga = np.asarray(list(groups), dtype=object)
        if ga.size != ya.size:
            raise ValueError("groups and labels differ in length")
        out["per_source"] = {
            str(g): evaluate_scores(ya[ga == g], pa[ga == g], threshold, with_groups=False)
            for g in sorted({str(x) for x in ga})
        }
    return out


__all__ = [
    "Confusion",
    "brier",
    "both_classes",
    "confusion",
    "curves",
    "delong_ci",
    "delong_paired",
    "evaluate_scores",
    "operating_point",
    "pr_auc",
    "reliability_curve",
    "roc_auc",
    "threshold_for_sensitivity",
    "threshold_table",
    "wilson",
]
