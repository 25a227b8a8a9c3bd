"""The outbox: one Delivery row per DICOM object per destination, sent exactly once.

States: ``pending`` → ``sending`` → ``delivered``, or back to ``pending`` with a later
``next_attempt_at`` after a failure (exponential backoff), or ``failed`` once
``deadline_at`` has passed.  A message claims a row with one conditional UPDATE
(``pending`` and due → ``sending``), so two copies of a message cannot both send.  A
delivered row is never sent again, except through :func:`redeliver` on an operator's
request.  Rows are written in the analysis transaction (:func:`create_deliveries`); the
reconciler re-publishes rows whose message was lost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from db import lifecycle
from db.broker import DELIVER_TASK
from db.errors import BadInputError
from db.lifecycle import DeliveryStatus
from db.models import (
    Analysis,
    AnalysisState,
    Delivery,
    DeliveryState,
    Study,
    as_utc,
    utcnow,
)
from db.session import Database
from db.settings import Destination, Settings
from dicom_node.sender import SendOutcome, read_header, send_files
from worker import metrics

if TYPE_CHECKING:
    from pydicom import Dataset

log = logging.getLogger(__name__)

#: Reason prefix of a row delivered in another SOP class: "sent as <class UID> <UID>".
SENT_AS = "sent as"


def parse_sent_as(reason: str | None) -> tuple[str, str] | None:
    """(SOP Class UID, SOP Instance UID) of the variant a row was delivered as, if any."""
    parts = (reason or "").split()
    if len(parts) == 4 and " ".join(parts[:2]) == SENT_AS:
        return parts[2], parts[3]
    return None


#: A message may arrive this much before its row is due (clock skew, countdown rounding).
EARLY_SLACK = timedelta(seconds=2)


class OutputObject(Protocol):
    """A DICOM object written to the outbox (see worker.outputs.OutputFile)."""

    kind: str
    sop_instance_uid: str
    path: Path


class Publisher(Protocol):
    def send_task(self, name: str, args: Any = ..., **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class SendResult:
    """What one C-STORE attempt came to: ``ok`` includes warning statuses."""

    ok: bool
    status: str | None
    reason: str | None
    permanent: bool = False  # retrying cannot help (unusable file, class refused)
    sent_uid: str | None = None
    sent_sop_class: str | None = None
    transfer_syntax: str | None = None


@dataclass(frozen=True)
class DeliveryOutcome:
    """``status``: delivered, retry (with ``countdown``), failed, noop."""

    delivery_id: int
    status: DeliveryStatus
    countdown: float | None = None
    reason: str | None = None


def create_deliveries(s: Session, settings: Settings, study_id: int, analysis_id: int | None,
                      objects: Sequence[OutputObject], now: datetime) -> list[Delivery]:
    """One pending row per object per destination, inside the caller's transaction."""
    rows: list[Delivery] = []
    deadline = now + timedelta(seconds=settings.delivery_deadline_seconds)
    for obj in objects:
        for dest in settings.pacs:
            existing = s.scalars(select(Delivery).where(
                Delivery.sop_instance_uid == obj.sop_instance_uid,
                Delivery.destination == str(dest))).first()
            if existing is not None:
                # Same content, same UID, already in the outbox: never twice.  It is part
                # of this analysis's results too, so it follows the analysis (redeliver
                # sends the current results).
                existing.analysis_id = analysis_id
                continue
            row = Delivery(
                analysis_id=analysis_id, study_id=study_id, kind=obj.kind,
                sop_instance_uid=obj.sop_instance_uid, destination=str(dest),
                path=str(obj.path), state=lifecycle.DELIVERY_INITIAL, attempts=0,
                next_attempt_at=now, deadline_at=deadline, created_at=now, updated_at=now,
            )
            s.add(row)
            rows.append(row)
    s.flush()
    return rows


def backoff_seconds(settings: Settings, attempts: int) -> float:
    """Delay after the ``attempts``-th failed attempt: base doubling up to the maximum."""
    delay = settings.delivery_backoff_seconds * (2 ** max(0, attempts - 1))
    return float(min(delay, settings.delivery_backoff_max_seconds))


def send(path: Path, destination: Destination, calling_ae: str) -> SendResult:
    """One C-STORE of one file.  Warning statuses count as stored (see dicom_node.sender)."""
    return send_many([path], destination, calling_ae)[0]


def _result(outcome: SendOutcome) -> SendResult:
    status = None if outcome.status is None else f"0x{outcome.status:04X}"
    return SendResult(outcome.ok, status, None if outcome.ok else outcome.reason,
                      permanent=outcome.permanent, sent_uid=outcome.sent_uid,
                      sent_sop_class=outcome.sent_sop_class,
                      transfer_syntax=outcome.transfer_syntax)


def send_many(paths: Sequence[Path], destination: Destination,
              calling_ae: str) -> list[SendResult]:
    """C-STORE of several files over one association; one result per path, in order.

    A missing or unreadable file fails for good without stopping the others.
    """
    results: list[SendResult | None] = [None] * len(paths)
    readable: list[int] = []
    headers: list[Dataset] = []
    for i, path in enumerate(paths):
        if not path.is_file():
            results[i] = SendResult(False, None, f"outbox file missing: {path}",
                                    permanent=True)
            continue
        try:
            headers.append(read_header(path))  # each outbox file is parsed once
        except BadInputError as exc:
            results[i] = SendResult(False, None, f"outbox file unreadable: {exc}",
                                    permanent=True)
            continue
        readable.append(i)
    if readable:
        outcomes = send_files([paths[i] for i in readable], destination, calling_ae,
                              headers=headers)
        for i, outcome in zip(readable, outcomes, strict=True):
            results[i] = _result(outcome)
    return [r for r in results if r is not None]


def _claim(db: Database, delivery_id: int, now: datetime) -> Delivery | None:
    with db.session() as s:
        if not lifecycle.claim_delivery(s, delivery_id, now + EARLY_SLACK, now):
            return None
        return s.get(Delivery, delivery_id)


def _claim_siblings(db: Database, row: Delivery, now: datetime) -> list[Delivery]:
    """The study's other due rows for the same destination, claimed to share the
    association; each claim is the same conditional UPDATE as for the first row."""
    with db.session() as s:
        ids = s.scalars(select(Delivery.id).where(
            Delivery.study_id == row.study_id, Delivery.destination == row.destination,
            Delivery.id != row.id, Delivery.state == DeliveryState.PENDING,
            Delivery.next_attempt_at <= now + EARLY_SLACK).order_by(Delivery.id)).all()
    claimed = [_claim(db, i, now) for i in ids]
    # The SR first: a viewer that opens the study as results arrive sees the call first.
    return sorted((c for c in claimed if c is not None), key=lambda r: (r.kind != "sr", r.id))


def _record_with(s: Session, settings: Settings, delivery_id: int, result: SendResult,
                 done_at: datetime) -> DeliveryOutcome:
    current = s.get(Delivery, delivery_id, with_for_update=True)
    assert current is not None
    deadline = as_utc(current.deadline_at)
    assert deadline is not None
    current.last_status = result.status
    current.updated_at = done_at
    if result.ok:
        lifecycle.delivery_sent(current, done_at)
        current.reason = None
        if result.sent_uid and result.sent_uid != current.sop_instance_uid:
            # Sent in another class the PACS accepted: the object there has its own UID.
            current.reason = f"{SENT_AS} {result.sent_sop_class} {result.sent_uid}"
        log.info("delivered kind=%s sop_uid=%s sent_uid=%s ts=%s destination=%s status=%s "
                 "attempts=%s", current.kind, current.sop_instance_uid, result.sent_uid,
                 result.transfer_syntax, current.destination, result.status,
                 current.attempts)
        metrics.delivery_outcome(current.kind, "delivered")
        return DeliveryOutcome(delivery_id, DeliveryStatus.DELIVERED)
    current.reason = result.reason or "send failed"
    if result.permanent or done_at >= deadline:
        lifecycle.delivery_failed(current, result.reason if result.permanent else
                                  f"deadline passed after {current.attempts} attempts; "
                                  f"last error: {result.reason}")
        log.error("delivery failed sop_uid=%s destination=%s reason=%s",
                  current.sop_instance_uid, current.destination, current.reason)
        metrics.delivery_outcome(current.kind, "failed")
        return DeliveryOutcome(delivery_id, DeliveryStatus.FAILED, reason=current.reason)
    delay = backoff_seconds(settings, current.attempts)
    next_at = min(done_at + timedelta(seconds=delay), deadline)
    lifecycle.delivery_retry(current, next_at)
    countdown = max(0.0, (next_at - done_at).total_seconds())
    log.warning("delivery retry sop_uid=%s destination=%s attempts=%s in_s=%.1f reason=%s",
                current.sop_instance_uid, current.destination, current.attempts,
                countdown, result.reason)
    metrics.delivery_outcome(current.kind, "retry")
    return DeliveryOutcome(delivery_id, DeliveryStatus.RETRY, countdown=countdown,
                           reason=result.reason)


def deliver(db: Database, settings: Settings, delivery_id: int,
            now: datetime | None = None) -> DeliveryOutcome:
    """Send one outbox row if it is pending and due, together with the study's other due
    rows for that destination over one association; record what happened to each."""
    now = now or utcnow()
    started = utcnow()
    row = _claim(db, delivery_id, now)
    if row is None:
        return DeliveryOutcome(delivery_id, DeliveryStatus.NOOP,
                               reason="not pending or not yet due")
    rows = [row, *_claim_siblings(db, row, now)]
    dest = Destination.parse(row.destination)
    try:
        results = send_many([Path(r.path) for r in rows], dest, settings.delivery_ae_title)
    except Exception as exc:  # the sender reports outcomes; anything raised is a fault of ours
        log.exception("delivery send raised delivery_id=%s", delivery_id)
        failed = SendResult(False, None, f"internal error: {type(exc).__name__}: {exc}")
        results = [failed] * len(rows)
    done_at = now + (utcnow() - started)  # the caller's clock, advanced by the send
    outcomes: dict[int, DeliveryOutcome] = {}
    with db.session() as s:
        for r, result in zip(rows, results, strict=True):
            outcomes[r.id] = _record_with(s, settings, r.id, result, done_at)
    return outcomes[delivery_id]


def publish(app: Publisher, settings: Settings, delivery_ids: Sequence[int],
            countdown: float | None = None) -> None:
    """Queue delivery messages on the delivery queue."""
    for delivery_id in delivery_ids:
        app.send_task(DELIVER_TASK, args=[delivery_id], queue=settings.delivery_queue,
                      countdown=countdown)


def redeliver(db: Database, settings: Settings, study_uid: str,
              app: Publisher | None = None) -> list[int]:
    """Send a study's results again on an operator's request: every delivered or failed
    row goes back to pending, due now, with a fresh deadline.  Returns the row ids; they
    are published on ``app`` (a Celery app built from settings when not given)."""
    now = utcnow()
    with db.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).first()
        if study is None:
            raise LookupError(f"no study with Study Instance UID {study_uid}")
        # Only the current results: a superseded analysis's objects are not sent again.
        rows = s.scalars(
            select(Delivery)
            .outerjoin(Analysis, Analysis.id == Delivery.analysis_id)
            .where(Delivery.study_id == study.id,
                   or_(Analysis.id.is_(None), Analysis.state != AnalysisState.SUPERSEDED))
            .order_by(Delivery.id)).all()
        ids: list[int] = []
        for row in rows:
            if row.state == DeliveryState.SENDING:
                continue
            lifecycle.redeliver(row, now,
                                now + timedelta(seconds=settings.delivery_deadline_seconds))
            ids.append(row.id)
    log.info("redelivery requested study_uid=%s deliveries=%s", study_uid, len(ids))
    if ids:
        if app is None:
            from db.broker import make_celery

            app = make_celery(settings)
        publish(app, settings, ids)
    return ids
