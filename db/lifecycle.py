"""The one owner of a study's and a delivery's state.

Every state write in the project goes through a named transition here; nobody else assigns
``state``.  Each transition checks the move against its table (a move not in the table is a
bug of ours: :class:`IllegalTransitionError`), and the ones that race with other processes
are compare-and-set ``UPDATE`` statements that report whether they won.

Study states (``db.models.StudyState``)::

    (new)      -> receiving                      first instance stored (listener)
    receiving  -> queued                         quiet for stable_seconds (stability, CAS)
    queued     -> analysing                      a worker claims it
    queued     -> queued                         no production model: it waits
    analysing  -> analysing | queued             redelivered claim | model unusable
    queued, analysing -> done | skipped | failed analysis stored | retries spent
    receiving  -> failed                         a late failure of the current generation
    any other  -> receiving                      a new instance reopens the study
                                                 (new generation)

Delivery states (``db.models.DeliveryState``)::

    (new)      -> pending                        outbox row written with the analysis
    pending    -> sending                        a delivery task claims it (CAS)
    sending    -> delivered | failed | pending   sent | permanent or deadline | retry later
    sending    -> pending                        the sender was lost (reconciler)
    pending, delivered, failed -> pending        operator asked for redelivery
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from db.errors import CxrError
from db.models import Delivery, DeliveryState, Study, StudyState

__all__ = [
    "DELIVERY_INITIAL",
    "DELIVERY_TRANSITIONS",
    "STUDY_INITIAL",
    "STUDY_TRANSITIONS",
    "AnalyseStatus",
    "DeliveryState",
    "DeliveryStatus",
    "IllegalTransitionError",
    "StudyState",
]


class IllegalTransitionError(CxrError):
    """A state change the tables do not allow: a bug of ours, never the data's fault."""


class AnalyseStatus(enum.StrEnum):
    """What one analyse message came to (stored nowhere; returned by the task)."""

    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    WAITING = "waiting"  # no usable model: the study waits in ``queued``
    STALE = "stale"  # a newer generation arrived
    DUPLICATE = "duplicate"
    MISSING = "missing"
    NOT_READY = "not_ready"  # still receiving
    GAVE_UP = "gave_up"  # attempt budget spent


class DeliveryStatus(enum.StrEnum):
    """What one deliver message came to."""

    DELIVERED = "delivered"
    FAILED = "failed"
    RETRY = "retry"
    NOOP = "noop"


_FINISHED = frozenset({StudyState.DONE, StudyState.SKIPPED, StudyState.FAILED})

STUDY_INITIAL = StudyState.RECEIVING
STUDY_TRANSITIONS: Mapping[StudyState, frozenset[StudyState]] = {
    StudyState.RECEIVING: frozenset({StudyState.QUEUED, StudyState.FAILED}),
    StudyState.QUEUED: frozenset({StudyState.RECEIVING, StudyState.QUEUED,
                                  StudyState.ANALYSING} | _FINISHED),
    StudyState.ANALYSING: frozenset({StudyState.RECEIVING, StudyState.QUEUED,
                                     StudyState.ANALYSING} | _FINISHED),
    StudyState.DONE: frozenset({StudyState.RECEIVING}),
    StudyState.SKIPPED: frozenset({StudyState.RECEIVING}),
    StudyState.FAILED: frozenset({StudyState.RECEIVING}),
}

DELIVERY_INITIAL = DeliveryState.PENDING
DELIVERY_TRANSITIONS: Mapping[DeliveryState, frozenset[DeliveryState]] = {
    DeliveryState.PENDING: frozenset({DeliveryState.SENDING, DeliveryState.PENDING}),
    DeliveryState.SENDING: frozenset({DeliveryState.DELIVERED, DeliveryState.FAILED,
                                      DeliveryState.PENDING}),
    DeliveryState.DELIVERED: frozenset({DeliveryState.PENDING}),
    DeliveryState.FAILED: frozenset({DeliveryState.PENDING}),
}


def _move(table: Mapping[Any, frozenset[Any]], kind: type[enum.StrEnum], row: Any,
          new: Any) -> None:
    old = kind(row.state)
    if new not in table[old]:
        raise IllegalTransitionError(
            f"{type(row).__name__} {getattr(row, 'id', None)}: {old} -> {new} is not allowed")
    row.state = new


# ------------------------------------------------------------------------------ studies
def reopen_study(study: Study) -> StudyState:
    """A new instance arrived for a study not receiving: a new generation starts.
    Returns the state it left."""
    previous = StudyState(study.state)
    _move(STUDY_TRANSITIONS, StudyState, study, StudyState.RECEIVING)
    study.generation = study.generation + 1
    study.published_at = None
    study.queued_at = None
    study.reason = None
    return previous


def queue_quiet_study(s: Session, study_id: int, generation: int, last_instance_at: Any,
                      now: datetime) -> bool:
    """receiving -> queued, compare-and-set: an instance arriving meanwhile (a new
    ``last_instance_at`` or generation) keeps the study receiving.  True when it won."""
    changed = s.execute(
        update(Study)
        .where(Study.id == study_id, Study.state == StudyState.RECEIVING,
               Study.generation == generation, Study.last_instance_at == last_instance_at)
        .values(state=StudyState.QUEUED, queued_at=now, updated_at=now, published_at=None)
    )
    return bool(getattr(changed, "rowcount", 0))


def mark_published(s: Session, study_id: int, generation: int, now: datetime) -> bool:
    """Record that the analyse message of this generation went to the broker (no state
    change; compare-and-set on the generation)."""
    changed = s.execute(
        update(Study)
        .where(Study.id == study_id, Study.generation == generation)
        .values(published_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(changed, "rowcount", 0))


def wait_for_model(study: Study, reason: str, now: datetime) -> None:
    """No usable production model: the study waits in ``queued`` with the reason."""
    _move(STUDY_TRANSITIONS, StudyState, study, StudyState.QUEUED)
    study.reason = reason
    study.updated_at = now


def start_analysis(study: Study, now: datetime) -> None:
    """A worker claimed the study (the caller holds the row for update)."""
    _move(STUDY_TRANSITIONS, StudyState, study, StudyState.ANALYSING)
    study.reason = None
    study.updated_at = now


def release_study(study: Study, reason: str, now: datetime) -> None:
    """analysing -> queued: the claimed model became unusable; the claim is given back."""
    _move(STUDY_TRANSITIONS, StudyState, study, StudyState.QUEUED)
    study.reason = reason
    study.attempts = max(0, (study.attempts or 0) - 1)
    study.updated_at = now


def fail_study(study: Study, reason: str, now: datetime) -> None:
    """The study failed with ``reason`` (bad input found late, retries or attempts spent)."""
    _move(STUDY_TRANSITIONS, StudyState, study, StudyState.FAILED)
    study.reason = reason
    study.updated_at = now


def finish_study(study: Study, state: StudyState, reason: str | None, now: datetime) -> None:
    """The analysis is stored: done, skipped or failed, and the attempt count resets."""
    if state not in _FINISHED:
        raise IllegalTransitionError(f"study {study.id}: {state} is not a finished state")
    _move(STUDY_TRANSITIONS, StudyState, study, state)
    study.reason = reason
    study.attempts = 0
    study.updated_at = now


# --------------------------------------------------------------------------- deliveries
def claim_delivery(s: Session, delivery_id: int, due_before: datetime, now: datetime) -> bool:
    """pending -> sending for a due row, compare-and-set; counts the attempt.  True when
    this caller won the row."""
    claimed = s.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING,
               Delivery.next_attempt_at <= due_before)
        .values(state=DeliveryState.SENDING, attempts=Delivery.attempts + 1, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return getattr(claimed, "rowcount", 0) == 1


def delivery_sent(row: Delivery, now: datetime) -> None:
    _move(DELIVERY_TRANSITIONS, DeliveryState, row, DeliveryState.DELIVERED)
    row.delivered_at = now


def delivery_failed(row: Delivery, reason: str | None) -> None:
    _move(DELIVERY_TRANSITIONS, DeliveryState, row, DeliveryState.FAILED)
    row.reason = reason


def delivery_retry(row: Delivery, next_attempt_at: datetime) -> None:
    """sending -> pending, due again at ``next_attempt_at``."""
    _move(DELIVERY_TRANSITIONS, DeliveryState, row, DeliveryState.PENDING)
    row.next_attempt_at = next_attempt_at


def release_lost_sender(row: Delivery, now: datetime) -> None:
    """sending -> pending now: the worker that claimed the row died mid-send."""
    _move(DELIVERY_TRANSITIONS, DeliveryState, row, DeliveryState.PENDING)
    row.next_attempt_at = now


def redeliver(row: Delivery, now: datetime, deadline: datetime) -> None:
    """The operator asked for the row to be sent again: a fresh budget from now."""
    _move(DELIVERY_TRANSITIONS, DeliveryState, row, DeliveryState.PENDING)
    row.next_attempt_at = now
    row.deadline_at = deadline
    row.attempts = 0
    row.reason = None
    row.updated_at = now
