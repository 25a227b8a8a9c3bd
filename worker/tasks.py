"""Thin Celery tasks: take ids, load state from the database, call plain functions.

Per-process state (settings, database engine, the loaded model) lives in one small
:class:`Runtime`, created on first use in each worker process (after a prefork fork),
never on the task object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Task
from sqlalchemy.exc import OperationalError

from db.broker import ANALYSE_TASK, DELIVER_TASK, RECONCILE_TASK
from db.errors import BadInputError, TransientError
from db.session import Database
from db.settings import Settings
from worker.app import app, settings

log = logging.getLogger(__name__)

#: Infrastructure trouble worth retrying (database, broker, disk, GPU memory).
TRANSIENT = (TransientError, OperationalError, ConnectionError, TimeoutError)


@dataclass
class Runtime:
    settings: Settings
    db: Database
    models: Any  # worker.model_cache.ModelCache, built on the first analysis


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's settings, database and model cache, built once."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(settings=settings, db=Database(settings), models=None)
    return _runtime


def model_cache(rt: Runtime) -> Any:
    if rt.models is None:
        from worker.model_cache import ModelCache

        rt.models = ModelCache(rt.settings)
    return rt.models


def _retry_countdown(retries: int) -> float:
    return float(min(2 ** retries * 2, 300))


@app.task(  # type: ignore[untyped-decorator]
    name=ANALYSE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
    max_retries=None)
def analyse_study(self: Task, study_id: int, generation: int) -> dict[str, Any]:
    """Analyse one study generation; see worker.analysis."""
    from worker.analysis import analyse_study as run
    from worker.analysis import mark_failed
    from worker.delivery import publish

    rt = runtime()
    try:
        outcome = run(rt.db, rt.settings, model_cache(rt), int(study_id), int(generation))
    except TRANSIENT as exc:
        retries = self.request.retries or 0
        if retries >= rt.settings.task_max_retries:
            reason = f"transient failure after {retries + 1} tries: {type(exc).__name__}: {exc}"
            mark_failed(rt.db, int(study_id), int(generation), reason)
            return {"study_id": study_id, "status": "failed", "reason": reason}
        log.warning("analysis retry study_id=%s generation=%s retries=%s error=%s",
                    study_id, generation, retries, exc)
        raise self.retry(exc=exc, countdown=_retry_countdown(retries)) from exc
    except BadInputError as exc:
        # The data's fault, found late: recorded with its reason, never retried.
        reason = f"bad input: {type(exc).__name__}: {exc}"[:2000]
        log.warning("analysis refused input study_id=%s generation=%s reason=%s", study_id,
                    generation, reason)
        mark_failed(rt.db, int(study_id), int(generation), reason)
        return {"study_id": study_id, "status": "failed", "reason": reason}
    except Exception as exc:
        # Neither bad input nor transient: a fault of ours.  Record it on the study so it
        # is never silent, then let Celery log the traceback; retrying would not help.
        reason = f"internal error: {type(exc).__name__}: {exc}"[:2000]
        log.exception("analysis failed study_id=%s generation=%s", study_id, generation)
        mark_failed(rt.db, int(study_id), int(generation), reason)
        raise
    if outcome.delivery_ids:
        try:
            publish(app, rt.settings, outcome.delivery_ids)
        except Exception as exc:  # the rows are committed; the reconciler publishes later
            log.warning("delivery publish failed study_id=%s error=%s (reconciler will retry)",
                        study_id, exc)
    return {"study_id": outcome.study_id, "status": outcome.status, "reason": outcome.reason,
            "analysis_id": outcome.analysis_id, "deliveries": list(outcome.delivery_ids)}


@app.task(  # type: ignore[untyped-decorator]
    name=DELIVER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
    max_retries=None)
def deliver(self: Task, delivery_id: int) -> dict[str, Any]:
    """Send one outbox row; failures come back with a countdown until the deadline."""
    from worker.delivery import deliver as run

    rt = runtime()
    try:
        outcome = run(rt.db, rt.settings, int(delivery_id))
    except TRANSIENT as exc:
        log.warning("delivery bookkeeping failed delivery_id=%s error=%s", delivery_id, exc)
        raise self.retry(exc=exc, countdown=_retry_countdown(self.request.retries or 0)) \
            from exc
    if outcome.status == "retry":
        raise self.retry(countdown=outcome.countdown)
    return {"delivery_id": delivery_id, "status": outcome.status, "reason": outcome.reason}


@app.task(  # type: ignore[untyped-decorator]
    name=RECONCILE_TASK, acks_late=True)
def reconcile() -> dict[str, Any]:
    """One reconciler pass (run by Celery beat; see worker.beat)."""
    from worker.reconciler import reconcile_once, summary

    rt = runtime()
    return summary(reconcile_once(rt.db, rt.settings, app))
