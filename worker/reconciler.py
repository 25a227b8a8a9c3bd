"""Re-publish work whose message was lost, judged from database state and age.

The broker only carries work; the database says what is owed.  A broker restart, a
SIGKILLed worker with the embedded filesystem transport (which has no unacked-message
restore) or a failed publish can each lose a message.  One pass:

- ``queued`` / ``analysing`` studies untouched for ``reconcile_after_seconds`` (by
  ``published_at`` and ``updated_at``) are published again;
- ``pending`` deliveries whose ``next_attempt_at`` has passed and that nobody touched for
  ``reconcile_after_seconds`` are published again;
- ``sending`` deliveries untouched that long (a worker died mid-send) go back to
  ``pending`` and are published again.

Re-publishing is safe because every task is idempotent.  A publish that fails (broker
down) leaves the row as it was, so the next pass tries again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select

from db import lifecycle
from db.models import Delivery, DeliveryState, Study, StudyState, utcnow
from db.session import Database
from db.settings import Settings
from dicom_node.publisher import AppPublisher, PublishError, publish_analysis
from worker.delivery import Publisher, publish

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    studies: list[int] = field(default_factory=list)
    deliveries: list[int] = field(default_factory=list)
    publish_errors: int = 0


def reconcile_once(db: Database, settings: Settings, celery_app: Publisher,
                   now: datetime | None = None) -> ReconcileReport:
    """One pass; returns the study and delivery ids published."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.reconcile_after_seconds)
    report = ReconcileReport()
    # An analysis may legitimately run until the task time limit (a fraction of the
    # visibility timeout, after which Redis redelivers by itself): only then is an
    # ``analysing`` study presumed lost, or a slow occlusion map would be computed twice.
    running_cutoff = now - timedelta(seconds=max(settings.reconcile_after_seconds,
                                                 settings.visibility_timeout))
    with db.session() as s:
        studies = s.scalars(
            select(Study).where(
                or_(
                    and_(Study.state == StudyState.QUEUED, Study.updated_at <= cutoff),
                    and_(Study.state == StudyState.ANALYSING,
                         Study.updated_at <= running_cutoff),
                ),
                or_(Study.published_at.is_(None), Study.published_at <= cutoff),
            ).order_by(Study.id)
        ).all()
        publisher = AppPublisher(celery_app, settings)
        for study in studies:
            try:
                publish_analysis(s, publisher, study.id, study.generation, now)
            except PublishError as exc:
                report.publish_errors += 1
                log.warning("republish failed study_uid=%s error=%s", study.study_uid, exc)
                break
            report.studies.append(study.id)
            log.info("study republished study_uid=%s state=%s generation=%s",
                     study.study_uid, study.state, study.generation)
    with db.session() as s:
        # A worker that died mid-send left its row in ``sending``: make it due again
        # (committed before the publish below, so the new message can claim it).
        for row in s.scalars(select(Delivery).where(
                Delivery.state == DeliveryState.SENDING, Delivery.updated_at <= cutoff)):
            lifecycle.release_lost_sender(row, now)
            log.warning("delivery released after lost sender delivery_id=%s sop_uid=%s",
                        row.id, row.sop_instance_uid)
    with db.session() as s:
        rows = s.scalars(
            select(Delivery).where(
                Delivery.state == DeliveryState.PENDING,
                Delivery.next_attempt_at <= now,
                Delivery.updated_at <= cutoff,
            ).order_by(Delivery.id)
        ).all()
        for row in rows:
            try:
                publish(celery_app, settings, [row.id])
            except Exception as exc:
                report.publish_errors += 1
                log.warning("republish failed delivery_id=%s error=%s", row.id, exc)
                break
            row.updated_at = now
            report.deliveries.append(row.id)
            log.info("delivery republished delivery_id=%s sop_uid=%s destination=%s",
                     row.id, row.sop_instance_uid, row.destination)
    return report


def reconcile_interval(settings: Settings) -> float:
    """How often beat runs a pass: often enough to notice a lost message soon after it
    becomes eligible, rarely enough to cost nothing."""
    return max(settings.scheduler_interval, min(60.0, settings.reconcile_after_seconds / 4))


def summary(report: ReconcileReport) -> dict[str, Any]:
    return {"studies": report.studies, "deliveries": report.deliveries,
            "publish_errors": report.publish_errors}
