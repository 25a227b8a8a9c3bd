"""The promotion floor and operator approval: what a model must show before it scores studies.

Beating the champion is not enough, and having no champion is no excuse: a model trained
on a handful of images can win every comparison and still be useless (a first model once
went to production with test specificity 0.000 on 13 test images).  So every challenger,
the first one included, must clear a floor set by the operator:

- ``promotion_min_test_per_class``: at least this many test images of each class, so the
  figures below mean something;
- ``promotion_min_auc_lower``: the lower bound of the 95% DeLong interval of the test ROC
  AUC at least this;
- ``promotion_min_specificity``: specificity at the operating threshold (chosen on
  validation for ``target_sensitivity``) at least this on the test images.

A model below the floor stays a *candidate*, with its reasons recorded on the model row
(``hold_reason``), where ``cxr-triage models``, ``status`` and the web page show them.
With ``promotion_requires_approval`` a model that clears the floor and beats the champion
also stays a candidate, ``awaiting approval``, until ``cxr-triage model approve VERSION``
records who approved it and when, and promotes it.
"""

from __future__ import annotations

import getpass
import logging
import os
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import ModelStage, ModelVersion, utcnow
from db.session import Database
from db.settings import Settings
from trainer.registry import ModelInfo, RegistryError, promote

log = logging.getLogger(__name__)

AWAITING_APPROVAL = "awaiting approval (CXR_PROMOTION_REQUIRES_APPROVAL=true)"


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def floor_reasons(metrics: Mapping[str, Any], settings: Settings) -> list[str]:
    """Why test ``metrics`` (from ``trainer.metrics.evaluate_scores``) fall below the floor.

    An empty list means the floor is met.
    """
    reasons: list[str] = []
    n_pos = int(metrics.get("n_positive") or 0)
    n_neg = int(metrics.get("n_negative") or (int(metrics.get("n") or 0) - n_pos))
    need = settings.promotion_min_test_per_class
    if need and min(n_pos, n_neg) < need:
        reasons.append(f"too few test images: {n_pos} positive and {n_neg} negative, at least "
                       f"{need} of each needed (promotion_min_test_per_class)")
    ci = metrics.get("auc_ci")
    auc_low = None if not ci else ci[0]
    if settings.promotion_min_auc_lower and (
            auc_low is None or auc_low < settings.promotion_min_auc_lower):
        reasons.append(f"test AUC {_fmt(metrics.get('auc'))}, 95% CI lower bound "
                       f"{_fmt(auc_low)} is below {settings.promotion_min_auc_lower} "
                       f"(promotion_min_auc_lower)")
    spec = metrics.get("specificity")
    if settings.promotion_min_specificity and (
            spec is None or spec < settings.promotion_min_specificity):
        reasons.append(f"test specificity {_fmt(spec)} at the threshold for sensitivity "
                       f"{settings.target_sensitivity} is below "
                       f"{settings.promotion_min_specificity} (promotion_min_specificity)")
    return reasons


def floor_summary(settings: Settings) -> str:
    return (f"floor: >= {settings.promotion_min_test_per_class} test images per class, "
            f"AUC lower bound >= {settings.promotion_min_auc_lower}, specificity >= "
            f"{settings.promotion_min_specificity}")


def metrics_line(metrics: Mapping[str, Any]) -> str:
    """AUC, sensitivity and specificity with their 95% intervals, on one line."""
    def with_ci(name: str, value: Any, ci: Any) -> str:
        interval = (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
                    if ci and ci[0] is not None and ci[1] is not None else "")
        return f"{name} {_fmt(value)}{interval}"

    return ", ".join([
        with_ci("AUC", metrics.get("auc"), metrics.get("auc_ci")),
        with_ci("sensitivity", metrics.get("sensitivity"), metrics.get("sensitivity_ci")),
        with_ci("specificity", metrics.get("specificity"), metrics.get("specificity_ci")),
    ]) + f" (n={metrics.get('n')}, positives={metrics.get('n_positive')})"


def hold(db: Database | Session, version: str, reason: str) -> None:
    """Leave ``version`` a candidate and record why it was not promoted."""
    if isinstance(db, Session):
        _hold(db, version, reason)
    else:
        with db.session() as s:
            _hold(s, version, reason)
    log.info("model held as candidate version=%s", version)


def _hold(s: Session, version: str, reason: str) -> None:
    row = s.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is None:
        raise RegistryError(f"no model version {version!r}")
    meta = dict(row.metadata_json or {})
    meta["hold_reason"] = reason
    row.metadata_json = meta


def approver() -> str:
    """Who is approving: the login name (SUDO_USER first, so sudo does not hide it)."""
    for name in (os.environ.get("SUDO_USER"), os.environ.get("USER")):
        if name:
            return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def approve(db: Database, version: str, by: str) -> ModelInfo:
    """Record that ``by`` approved ``version`` now, and promote it.

    Only a candidate that cleared the floor and is awaiting approval can be approved: a
    model below the floor, a rejected one or one already in production is refused.
    """
    if not by.strip():
        raise RegistryError("the approver's name is empty")
    with db.session() as s:
        row = s.scalar(select(ModelVersion).where(ModelVersion.version == version))
        if row is None:
            raise RegistryError(f"no model version {version!r}")
        meta = dict(row.metadata_json or {})
        if row.stage != ModelStage.CANDIDATE:
            raise RegistryError(f"model {version!r} is {row.stage}, not a candidate")
        if meta.get("hold_reason") != AWAITING_APPROVAL:
            why = meta.get("hold_reason") or "it was not evaluated by the nightly trainer"
            raise RegistryError(f"model {version!r} is not awaiting approval: {why}")
        meta.pop("hold_reason", None)
        meta["approved_by"] = by.strip()
        meta["approved_at"] = utcnow().isoformat()
        row.metadata_json = meta
    info = promote(db, version)
    log.info("model approved version=%s by=%s", version, by.strip())
    return info


def not_promoted_reason(meta: Mapping[str, Any] | None) -> str | None:
    """Why a model row is not (or was not) in production, from its metadata."""
    meta = meta or {}
    reason = meta.get("hold_reason") or meta.get("rejected_reason")
    return None if reason is None else str(reason)


__all__ = ["AWAITING_APPROVAL", "approve", "approver", "floor_reasons", "floor_summary",
           "hold", "metrics_line", "not_promoted_reason"]
