"""The real-world record: what each model said when a study was analysed, against the
labels that arrived later; and which labels are new since the last nightly run.

Predictions are never recomputed here: ``Analysis.probability`` / ``positive`` are what
the deployed model reported at the time, so these figures are the deployed performance,
month by month and per model version.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import select

from db.models import Analysis, AnalysisState, Label, ModelVersion, RetrainRun, Study, as_utc
from db.session import Database
from trainer.metrics import wilson


def deployed_record(db: Database) -> list[dict[str, Any]]:
    """Sensitivity, specificity and positive rate as deployed, by model version and month.

    Each study counts once per model version: its latest finished analysis by that model.
    """
    with db.session() as s:
        rows = s.execute(
            select(ModelVersion.version, Analysis.study_id, Analysis.positive,
                   Analysis.started_at, Analysis.id, Label.label)
            .join(ModelVersion, ModelVersion.id == Analysis.model_version_id)
            .join(Label, (Label.study_id == Analysis.study_id) & Label.current.is_(True))
            .where(Analysis.state == AnalysisState.DONE, Analysis.positive.is_not(None))
            .order_by(Analysis.id)
        ).all()
    latest: dict[tuple[str, int], tuple[bool, datetime, int]] = {}
    for version, study_id, positive, started, _aid, label in rows:
        latest[(version, study_id)] = (bool(positive), started, int(label))
    cells: dict[tuple[str, str], list[tuple[bool, int]]] = defaultdict(list)
    for (version, _sid), (positive, started, label) in latest.items():
        when = as_utc(started)
        month = when.strftime("%Y-%m") if when else "unknown"
        cells[(version, month)].append((positive, label))
    out = []
    for (version, month), items in sorted(cells.items()):
        tp = sum(1 for p, y in items if p and y == 1)
        fn = sum(1 for p, y in items if not p and y == 1)
        tn = sum(1 for p, y in items if not p and y == 0)
        fp = sum(1 for p, y in items if p and y == 0)
        sens, slo, shi = wilson(tp, tp + fn)
        spec, plo, phi = wilson(tn, tn + fp)
        out.append({
            "model_version": version, "month": month, "n": len(items), "n_positive": tp + fn,
            "sensitivity": sens, "sensitivity_ci": None if slo is None else [slo, shi],
            "specificity": spec, "specificity_ci": None if plo is None else [plo, phi],
            "positive_rate": (tp + fp) / len(items),
            "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        })
    return out


def last_completed_run_start(db: Database) -> datetime | None:
    """When the last run that trained (not a no-op, not a dry run) started."""
    with db.session() as s:
        when = s.scalar(
            select(RetrainRun.started_at)
            .where(RetrainRun.status == "done", RetrainRun.dry_run.is_(False))
            .order_by(RetrainRun.started_at.desc())
        )
    return as_utc(when)


def new_label_study_ids(db: Database, since: datetime | None) -> set[int]:
    """Studies whose current label was imported after ``since`` (all when None)."""
    with db.session() as s:
        q = select(Label.study_id, Label.imported_at).where(Label.current.is_(True))
        rows = s.execute(q).all()
    out = set()
    for sid, imported in rows:
        when = as_utc(imported)
        if since is None or (when is not None and when > since):
            out.add(int(sid))
    return out


def study_uids(db: Database, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    with db.session() as s:
        rows = s.execute(select(Study.id, Study.study_uid).where(Study.id.in_(ids))).all()
    return {int(i): str(u) for i, u in rows}


def drift_summary(reference: dict[str, Any] | None, recent: dict[str, Any]) -> dict[str, Any]:
    """The champion on recently labelled studies vs its figures at registration."""
    out: dict[str, Any] = {"recent": {k: recent.get(k) for k in (
        "n", "n_positive", "auc", "auc_ci", "sensitivity", "sensitivity_ci", "specificity",
        "specificity_ci", "positive_rate")}}
    if reference:
        out["reference"] = {k: reference.get(k) for k in (
            "auc", "sensitivity", "specificity", "positive_rate")}
        for k in ("auc", "sensitivity", "specificity", "positive_rate"):
            a, b = recent.get(k), reference.get(k)
            out[f"delta_{k}"] = None if a is None or b is None else float(a) - float(b)
    return out


__all__ = [
    "deployed_record",
    "drift_summary",
    "last_completed_run_start",
    "new_label_study_ids",
    "study_uids",
]
