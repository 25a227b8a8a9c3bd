"""The gauges the metrics collector exports, read from the database at scrape time.

They live in the pipeline floor (not in ``worker.console.status``) because
``worker.metrics`` serves them from every worker process, and the pipeline never imports
the console.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from db.models import (
    Analysis,
    AnalysisState,
    Delivery,
    DeliveryState,
    ModelVersion,
    RetrainRun,
    Study,
    StudyState,
    as_utc,
    utcnow,
)
from trainer.registry import production_model

#: Study states in which a study still waits for the pipeline to act on it.
WAITING_STATES = (StudyState.RECEIVING, StudyState.QUEUED, StudyState.ANALYSING)


@dataclass
class Gauges:
    """Numbers the metrics collector exports, read in one short session."""

    studies_by_state: dict[str, int]
    deliveries_by_state: dict[str, int]
    oldest_waiting_seconds: float
    production_version: str | None
    calls_by_version: dict[str, tuple[int, int]]  # version -> (scored, positive)
    oldest_queued_seconds: float = 0.0
    # (finished at, as a Unix time; seconds it took) of the last nightly run that trained
    last_retrain: tuple[float, float] | None = None


def read_gauges(db: Any) -> Gauges:
    """Current counts for Prometheus; ``db`` is a :class:`db.session.Database`."""
    with db.session() as s:
        by_state = {state.value: 0 for state in StudyState}
        for state, n in s.execute(select(Study.state, func.count()).group_by(Study.state)):
            by_state[str(state)] = int(n)
        deliveries = {state.value: 0 for state in DeliveryState}
        for state, n in s.execute(select(Delivery.state, func.count())
                                  .group_by(Delivery.state)):
            deliveries[str(state)] = int(n)
        oldest = s.scalar(select(func.min(Study.received_at))
                          .where(Study.state.in_([w.value for w in WAITING_STATES])))
        oldest_aware = as_utc(oldest)
        wait = (utcnow() - oldest_aware).total_seconds() if oldest_aware else 0.0
        prod = production_model(s)
        calls: dict[str, tuple[int, int]] = {}
        rows = s.execute(
            select(ModelVersion.version, Analysis.positive, func.count())
            .join(Analysis, Analysis.model_version_id == ModelVersion.id)
            .where(Analysis.state == AnalysisState.DONE, Analysis.positive.is_not(None))
            .group_by(ModelVersion.version, Analysis.positive)
        ).all()
        for version, positive, n in rows:
            total, pos = calls.get(version, (0, 0))
            calls[version] = (total + int(n), pos + (int(n) if positive else 0))
        queued = as_utc(s.scalar(select(func.min(func.coalesce(Study.queued_at,
                                                               Study.received_at)))
                                 .where(Study.state == StudyState.QUEUED)))
        queued_wait = (utcnow() - queued).total_seconds() if queued else 0.0
        run = s.scalars(select(RetrainRun)
                        .where(RetrainRun.status == "done", RetrainRun.dry_run.is_(False),
                               RetrainRun.finished_at.is_not(None))
                        .order_by(RetrainRun.finished_at.desc()).limit(1)).first()
        last_retrain = None
        if run is not None:
            finished, started = as_utc(run.finished_at), as_utc(run.started_at)
            assert finished is not None and started is not None
            last_retrain = (finished.timestamp(), (finished - started).total_seconds())
        return Gauges(by_state, deliveries, max(0.0, wait),
                      prod.version if prod is not None else None, calls,
                      max(0.0, queued_wait), last_retrain)
