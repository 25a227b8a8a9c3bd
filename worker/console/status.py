"""The data behind ``cxr-triage status`` and the operator's web page.

Everything here is read-only and returns plain JSON-ready values.  Patient names, patient
IDs and accession numbers are never selected, so no caller can print them by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import (
    Analysis,
    Delivery,
    DeliveryState,
    Evaluation,
    ModelStage,
    ModelVersion,
    Prediction,
    Study,
    StudyState,
    as_utc,
    utcnow,
)
from trainer.registry import production_model
from worker.gauges import WAITING_STATES


def _iso(value: datetime | None) -> str | None:
    aware = as_utc(value)
    return aware.isoformat() if aware is not None else None


@dataclass(frozen=True)
class StatusQuery:
    """What to list: the newest ``limit`` studies, optionally one state only."""

    limit: int = 200
    state: str | None = None
    offset: int = 0  # skip this many of the newest (paging)


def _latest_analyses(s: Session, study_ids: list[int]) -> dict[int, Analysis]:
    if not study_ids:
        return {}
    newest = (
        select(Analysis.study_id, func.max(Analysis.id).label("aid"))
        .where(Analysis.study_id.in_(study_ids))
        .group_by(Analysis.study_id)
        .subquery()
    )
    rows = s.scalars(select(Analysis).join(newest, Analysis.id == newest.c.aid)).all()
    return {a.study_id: a for a in rows}


def _heatmaps(s: Session, analysis_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    if not analysis_ids:
        return out
    rows = s.execute(
        select(Prediction.analysis_id, Prediction.id, Prediction.heatmap_path,
               Prediction.probability, Prediction.pneumonia_probability)
        .where(Prediction.analysis_id.in_(analysis_ids), Prediction.heatmap_path.is_not(None))
        .order_by(Prediction.id)
    ).all()
    for aid, pid, path, prob, pneu in rows:
        out.setdefault(aid, []).append(
            {"prediction_id": pid, "path": str(path), "probability": prob,
             "pneumonia_probability": pneu})
    return out


def delivery_dict(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "destination": d.destination,
        "kind": d.kind,
        "state": d.state,
        "attempts": d.attempts,
        "reason": d.reason,
        "sop_instance_uid": d.sop_instance_uid,
        "delivered_at": _iso(d.delivered_at),
    }


def prediction_dict(a: Analysis | None) -> dict[str, Any] | None:
    if a is None:
        return None
    return {
        "analysis_id": a.id,
        "state": a.state,
        "probability": a.probability,
        "positive": a.positive,
        "threshold": a.threshold,
        "pneumonia_probability": a.pneumonia_probability,
        "pneumonia_positive": a.pneumonia_positive,
        "pneumonia_threshold": a.pneumonia_threshold,
        "model_version": a.model_version.version if a.model_version is not None else None,
        "heatmap_method": a.heatmap_method,
        "reason": a.reason,
        "finished_at": _iso(a.finished_at),
    }


def list_studies(s: Session, query: StatusQuery = StatusQuery()) -> list[dict[str, Any]]:
    """The newest studies with their latest prediction and their deliveries."""
    stmt = (select(Study).order_by(Study.received_at.desc(), Study.id.desc())
            .offset(query.offset).limit(query.limit))
    if query.state:
        stmt = stmt.where(Study.state == query.state)
    studies = list(s.scalars(stmt).all())
    ids = [st.id for st in studies]
    latest = _latest_analyses(s, ids)
    heatmaps = _heatmaps(s, [a.id for a in latest.values()])
    deliveries: dict[int, list[Delivery]] = {}
    if ids:
        for d in s.scalars(
            select(Delivery).where(Delivery.study_id.in_(ids)).order_by(Delivery.id)
        ).all():
            deliveries.setdefault(d.study_id, []).append(d)
    counts = dict(
        s.execute(
            select(Study.id, func.count())
            .select_from(Study)
            .join(Study.instances)
            .where(Study.id.in_(ids))
            .group_by(Study.id)
        ).all()
    ) if ids else {}
    out = []
    for st in studies:
        analysis = latest.get(st.id)
        out.append(
            {
                "study_uid": st.study_uid,
                "state": st.state,
                "instances": int(counts.get(st.id, 0)),
                "received_at": _iso(st.received_at),
                "updated_at": _iso(st.updated_at),
                "reason": st.reason,
                "generation": st.generation,
                # The latest call, at the top level where operators' scripts read it ...
                "probability": analysis.probability if analysis is not None else None,
                "positive": analysis.positive if analysis is not None else None,
                "pneumonia_probability": (analysis.pneumonia_probability
                                          if analysis is not None else None),
                "pneumonia_positive": (analysis.pneumonia_positive
                                       if analysis is not None else None),
                "model_version": (analysis.model_version.version if analysis is not None
                                  and analysis.model_version is not None else None),
                "heatmap_method": analysis.heatmap_method if analysis is not None else None,
                # ... and the analysis behind it in full.
                "prediction": prediction_dict(analysis),
                "heatmaps": heatmaps.get(analysis.id, []) if analysis is not None else [],
                "deliveries": [delivery_dict(d) for d in deliveries.get(st.id, [])],
            }
        )
    return out


def evaluation_dict(e: Evaluation | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {
        "kind": e.kind,
        "dataset": e.dataset,
        "n_images": e.n_images,
        "auc": e.auc,
        "sensitivity": e.sensitivity,
        "specificity": e.specificity,
        "report_path": e.report_path,
        "created_at": _iso(e.created_at),
    }


def latest_evaluation(s: Session, model_version_id: int) -> Evaluation | None:
    return s.scalars(
        select(Evaluation)
        .where(Evaluation.model_version_id == model_version_id)
        .order_by(Evaluation.created_at.desc(), Evaluation.id.desc())
        .limit(1)
    ).first()


def model_dict(s: Session, m: ModelVersion) -> dict[str, Any]:
    meta = m.metadata_json or {}
    reason = meta.get("hold_reason") or meta.get("rejected_reason")
    return {
        # why it is not in production (below the promotion floor, awaiting approval, or
        # worse than the champion); None for the production model and older ones
        "not_promoted_reason": None if m.stage == ModelStage.PRODUCTION or reason is None
        else str(reason),
        "approved_by": meta.get("approved_by"),
        "approved_at": meta.get("approved_at"),
        "version": m.version,
        "architecture": m.architecture,
        "stage": m.stage,
        "threshold": m.threshold,
        "input_size": m.input_size,
        "parent_version": m.parent_version,
        "created_at": _iso(m.created_at),
        "promoted_at": _iso(m.promoted_at),
        "last_evaluation": evaluation_dict(latest_evaluation(s, m.id)),
    }


def list_models(s: Session) -> list[dict[str, Any]]:
    """Every registered model version, newest first, with its last evaluation."""
    rows = s.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc(),
                                                   ModelVersion.id.desc())).all()
    return [model_dict(s, m) for m in rows]


def production_row(s: Session) -> ModelVersion | None:
    """The production model's row, found through the one registry reader."""
    info = production_model(s)
    return None if info is None else s.get(ModelVersion, info.id)


def summary(s: Session) -> dict[str, Any]:
    """Counts by state, the oldest waiting study, failed deliveries and the production model."""
    by_state = {state.value: 0 for state in StudyState}
    for state, n in s.execute(select(Study.state, func.count()).group_by(Study.state)).all():
        by_state[str(state)] = int(n)
    oldest = s.scalars(
        select(Study)
        .where(Study.state.in_([w.value for w in WAITING_STATES]))
        .order_by(Study.received_at.asc(), Study.id.asc())
        .limit(1)
    ).first()
    oldest_dict = None
    if oldest is not None:
        received = as_utc(oldest.received_at)
        oldest_dict = {
            "study_uid": oldest.study_uid,
            "state": oldest.state,
            "received_at": _iso(oldest.received_at),
            "waiting_seconds": (utcnow() - received).total_seconds() if received else None,
        }
    failed = s.scalars(
        select(Delivery).where(Delivery.state == DeliveryState.FAILED).order_by(Delivery.id)
    ).all()
    failed_list = []
    for d in failed:
        item = delivery_dict(d)
        item["study_uid"] = d.study.study_uid
        failed_list.append(item)
    prod = production_row(s)
    newest = s.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc(),
                                                     ModelVersion.id.desc()).limit(1)).first()
    return {
        "newest_model_not_promoted": (model_dict(s, newest) if newest is not None
                                      and newest.stage != ModelStage.PRODUCTION else None),
        "studies_by_state": by_state,
        "total_studies": sum(by_state.values()),
        "oldest_waiting": oldest_dict,
        "failed_deliveries": failed_list,
        "production_model": model_dict(s, prod) if prod is not None else None,
    }


def collect_status(s: Session, query: StatusQuery = StatusQuery()) -> dict[str, Any]:
    """The whole ``status --json`` object: ``{"studies": [...], "summary": {...}}``."""
    return {"studies": list_studies(s, query), "summary": summary(s)}
