"""Stable-study queueing: a study quiet for ``stable_seconds`` is queued and published.

:func:`run_stability_pass` is a plain function (tests and ``cxr-triage up`` call it);
:class:`StabilityLoop` runs it in a thread of the listener every ``scheduler_interval``
seconds.  The database is the source of truth: a study is marked ``queued`` first, and
``published_at`` is set only after the broker took the message, so a crash or a broker
outage between the two is repaired by the next pass (at-least-once publication; the worker
is idempotent per study generation).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from db import lifecycle
from db.models import Study, StudyState, as_utc, utcnow
from db.session import Database
from db.settings import Settings
from dicom_node.publisher import Publisher, PublishError, publish_analysis

log = logging.getLogger(__name__)


@dataclass
class PassReport:
    """Study ids touched by one pass."""

    queued: list[int] = field(default_factory=list)
    published: list[int] = field(default_factory=list)
    unpublished: list[int] = field(default_factory=list)


def queue_quiet_studies(db: Database, settings: Settings, now: datetime) -> list[int]:
    """Mark ``receiving`` studies whose last instance is ``stable_seconds`` old as ``queued``."""
    cutoff = now - timedelta(seconds=settings.stable_seconds)
    queued: list[int] = []
    with db.session() as s:
        rows = s.execute(
            select(Study.id, Study.study_uid, Study.generation, Study.last_instance_at)
            .where(Study.state == StudyState.RECEIVING)
        ).all()
        for study_id, study_uid, generation, last in rows:
            last_at = as_utc(last)
            if last_at is None or last_at > cutoff:
                continue
            # Compare-and-set: an instance arriving meanwhile keeps the study receiving.
            if lifecycle.queue_quiet_study(s, study_id, generation, last, now):
                queued.append(study_id)
                log.info("study %s receiving -> queued generation=%d study_id=%d", study_uid,
                         generation, study_id)
    return queued


def publish_queued(
    db: Database, publisher: Publisher, now: datetime
) -> tuple[list[int], list[int]]:
    """Publish every ``queued`` study not yet published; returns (published, still unpublished)."""
    with db.session() as s:
        pending = s.execute(
            select(Study.id, Study.study_uid, Study.generation)
            .where(Study.state == StudyState.QUEUED, Study.published_at.is_(None))
            .order_by(Study.queued_at, Study.id)
        ).all()
    published: list[int] = []
    unpublished: list[int] = []
    for index, (study_id, study_uid, generation) in enumerate(pending):
        try:
            with db.session() as s:
                publish_analysis(s, publisher, study_id, generation, now)
        except PublishError as exc:
            rest = [row[0] for row in pending[index:]]
            unpublished.extend(rest)
            log.warning("publish failed; %d studies stay queued: %s", len(rest), exc)
            break
        published.append(study_id)
        log.info("study %s published generation=%d study_id=%d", study_uid, generation, study_id)
    return published, unpublished


def run_stability_pass(db: Database, settings: Settings, publisher: Publisher,
                       now: datetime | None = None) -> PassReport:
    """One pass: queue quiet studies, then publish queued ones that were never published."""
    now = now or utcnow()
    report = PassReport()
    report.queued = queue_quiet_studies(db, settings, now)
    report.published, report.unpublished = publish_queued(db, publisher, now)
    return report


class StabilityLoop:
    """Runs :func:`run_stability_pass` in a daemon thread until stopped."""

    def __init__(self, db: Database, settings: Settings, publisher: Publisher) -> None:
        self.db = db
        self.settings = settings
        self.publisher = publisher
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cxr-stability", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                run_stability_pass(self.db, self.settings, self.publisher)
            except SQLAlchemyError as exc:
                log.warning("stability pass failed, retrying next tick: %s", exc)
            except Exception:  # a bug must not stop queueing for good while stores go on
                log.exception("stability pass failed unexpectedly, retrying next tick")
            self._stop.wait(self.settings.scheduler_interval)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
