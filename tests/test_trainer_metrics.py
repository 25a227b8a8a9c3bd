"""Trainer evaluation maths (trainer.metrics) against hand-computed values and sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from trainer.metrics import (
    confusion,
    delong_ci,
    delong_paired,
    evaluate_scores,
    operating_point,
    reliability_curve,
    roc_auc,
    threshold_for_sensitivity,
    wilson,
)


def test_wilson_matches_known_values() -> None:
    p, lo, hi = wilson(8, 10)
    assert p == 0.8
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 0) == (None, None, None)
    assert wilson(0, 5)[1] == 0.0


def test_auc_and_delong_against_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.normal(y * 1.0, 1.0), 1)  # ties on purpose
    auc, ci = delong_ci(y, p)
    assert auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert ci is not None and ci[0] < auc < ci[1]
    assert 0.05 < ci[1] - ci[0] < 0.2
    assert roc_auc([1, 1], [0.2, 0.3]) is None


def test_delong_paired_sees_a_real_difference() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    good = rng.normal(y * 2.0, 1.0)
    bad = rng.normal(y * 0.2, 1.0)
    d = delong_paired(y, good, bad)
    assert d["diff"] is not None and d["diff"] < -0.2
    assert d["p_value"] is not None and d["p_value"] < 1e-6


def test_threshold_for_sensitivity_reaches_target() -> None:
    y = np.array([1] * 50 + [0] * 50)
    p = np.concatenate([np.linspace(0.3, 1.0, 50), np.linspace(0.0, 0.6, 50)])
    t = threshold_for_sensitivity(y, p, 0.98)
    c = confusion(y, p, t)
    assert c.tp / 50 >= 0.98
    assert confusion(y, p, t + 1e-9).tp / 50 < 0.98  # the highest such threshold
    with pytest.raises(ValueError):
        threshold_for_sensitivity([0, 0], [0.1, 0.2], 0.9)


def test_operating_point_and_groups() -> None:
    y = [1, 1, 1, 0, 0, 0, 1, 0]
    p = [0.9, 0.8, 0.4, 0.7, 0.1, 0.2, 0.6, 0.3]
    op = operating_point(y, p, 0.5)
    assert op["confusion"] == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
    assert op["sensitivity"] == 0.75 and op["specificity"] == 0.75
    assert op["f1"] == pytest.approx(0.75)
    assert op["ppv_ci"][0] < 0.75 < op["ppv_ci"][1]
    ev = evaluate_scores(y, p, 0.5, groups=["a", "a", "a", "a", "b", "b", "b", "b"])
    assert set(ev["per_source"]) == {"a", "b"}
    assert ev["per_source"]["b"]["n"] == 4
    assert ev["brier"] == pytest.approx(np.mean((np.array(p) - np.array(y)) ** 2))
    assert len(ev["threshold_table"]) == 9
    assert sum(b["n"] for b in reliability_curve(y, p)) == 8
    assert not math.isnan(ev["auc"])


def test_curves_and_average_precision_match_sklearn() -> None:
    """The numpy ROC / PR curves and average precision equal scikit-learn's, ties included."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    from trainer.metrics import pr_auc, pr_points, roc_points

    for seed in range(12):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(3, 300))
        y = rng.integers(0, 2, n)
        y[:2] = (0, 1)
        p = np.round(rng.normal(y * 1.0, 1.0), int(rng.integers(0, 3)))
        fpr, tpr, _ = roc_curve(y, p)
        ours_fpr, ours_tpr = roc_points(y, p)
        np.testing.assert_allclose(ours_fpr, fpr)
        np.testing.assert_allclose(ours_tpr, tpr)
        precision, recall, _ = precision_recall_curve(y, p)
        ours_precision, ours_recall = pr_points(y, p)
        np.testing.assert_allclose(ours_precision, precision)
        np.testing.assert_allclose(ours_recall, recall)
        assert pr_auc(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)
    with pytest.raises(ValueError):
        roc_points([1, 1], [0.1, 0.2])
