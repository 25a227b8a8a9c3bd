"""Thin Celery tasks: take ids, load state from the database, call plain functions.

Per-process state (settings, database engine, the loaded model) lives in one small
:class:`Runtime`, created on first use in each worker process (after a prefork fork),
never on the task object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Task, shared_task
from sqlalchemy.exc import OperationalError

from db.broker import ANALYSE_TASK, DELIVER_TASK, RECONCILE_TASK
from db.errors import BadInputError, TransientError
from db.lifecycle import AnalyseStatus, DeliveryStatus
from db.session import Database
from db.settings import Settings

log = logging.getLogger(__name__)

#: Infrastructure trouble worth retrying (database, broker, disk, GPU memory).
TRANSIENT = (TransientError, OperationalError, ConnectionError, TimeoutError)

#: The declared retry policy for infrastructure trouble: Celery retries TRANSIENT errors
#: after ``min(300, 2 * 2**n)`` seconds; the count (``max_retries``) comes from the settings
#: through :func:`worker.app.task_policy`, the one budget.
RETRY_POLICY: dict[str, Any] = {"autoretry_for": TRANSIENT, "retry_backoff": 2,
                                "retry_backoff_max": 300, "retry_jitter": False}


@dataclass
class Runtime:
    settings: Settings
    db: Database
    models: Any  # worker.model_cache.ModelCache, built on the first analysis


def bind_settings(celery_app: Any, s: Settings) -> None:
    """Attach the settings an app is built for (``worker.app.create_app`` calls this)."""
    setattr(celery_app, "cxr_settings", s)  # noqa: B010


def app_settings(celery_app: Any) -> Settings:
    """The settings ``celery_app`` was built for by ``worker.app.create_app``."""
    s = getattr(celery_app, "cxr_settings", None)
    if not isinstance(s, Settings):
        raise RuntimeError("this Celery app was not built by worker.app.create_app")
    return s


def runtime(celery_app: Any) -> Runtime:
    """This process's settings, database and model cache for ``celery_app``, built once
    (on first use, so after a prefork fork), never on the task object."""
    rt = getattr(celery_app, "cxr_runtime", None)
    if rt is None:
        s = app_settings(celery_app)
        rt = Runtime(settings=s, db=Database(s), models=None)
        setattr(celery_app, "cxr_runtime", rt)  # noqa: B010
    assert isinstance(rt, Runtime)
    return rt


def model_cache(rt: Runtime) -> Any:
    if rt.models is None:
        from worker.model_cache import ModelCache

        rt.models = ModelCache(rt.settings)
    return rt.models


class AnalyseTask(Task):  # type: ignore[misc]
    """Records the study as failed once the declared retries for infrastructure trouble
    are spent (Celery re-raises the last error then)."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        if not isinstance(exc, TRANSIENT) or len(args) < 2:
            return
        from worker.analysis import mark_failed

        retries = self.request.retries or 0
        reason = f"transient failure after {retries + 1} tries: {type(exc).__name__}: {exc}"
        mark_failed(runtime(self.app).db, int(args[0]), int(args[1]), reason)


@shared_task(  # type: ignore[untyped-decorator]
    name=ANALYSE_TASK, bind=True, base=AnalyseTask, acks_late=True,
    reject_on_worker_lost=True, **RETRY_POLICY)
def analyse_study(self: Task, study_id: int, generation: int) -> dict[str, Any]:
    """Analyse one study generation; see worker.analysis.  Retry policy: worker.app."""
    from worker.analysis import analyse_study as run
    from worker.analysis import mark_failed
    from worker.delivery import publish

    rt = runtime(self.app)
    try:
        outcome = run(rt.db, rt.settings, model_cache(rt), int(study_id), int(generation))
    except TRANSIENT as exc:
        log.warning("analysis retry study_id=%s generation=%s retries=%s error=%s",
                    study_id, generation, self.request.retries or 0, exc)
        raise
    except BadInputError as exc:
        # The data's fault, found late: recorded with its reason, never retried.
        reason = f"bad input: {type(exc).__name__}: {exc}"[:2000]
        log.warning("analysis refused input study_id=%s generation=%s reason=%s", study_id,
                    generation, reason)
        mark_failed(rt.db, int(study_id), int(generation), reason)
        return {"study_id": study_id, "status": AnalyseStatus.FAILED, "reason": reason}
    except Exception as exc:
        # Neither bad input nor transient: a fault of ours.  Record it on the study so it
        # is never silent, then let Celery log the traceback; retrying would not help.
        reason = f"internal error: {type(exc).__name__}: {exc}"[:2000]
        log.exception("analysis failed study_id=%s generation=%s", study_id, generation)
        mark_failed(rt.db, int(study_id), int(generation), reason)
        raise
    if outcome.delivery_ids:
        try:
            publish(self.app, rt.settings, outcome.delivery_ids)
        except Exception as exc:  # the rows are committed; the reconciler publishes later
            log.warning("delivery publish failed study_id=%s error=%s (reconciler will retry)",
                        study_id, exc)
    return {"study_id": outcome.study_id, "status": outcome.status, "reason": outcome.reason,
            "analysis_id": outcome.analysis_id, "deliveries": list(outcome.delivery_ids)}


@shared_task(  # type: ignore[untyped-decorator]
    name=DELIVER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
    **RETRY_POLICY)
def deliver(self: Task, delivery_id: int) -> dict[str, Any]:
    """Send one outbox row; a refused or unreachable peer comes back with the countdown
    the delivery's deadline allows (worker.delivery).  Retry policy: worker.app."""
    from worker.delivery import deliver as run

    rt = runtime(self.app)
    try:
        outcome = run(rt.db, rt.settings, int(delivery_id))
    except TRANSIENT as exc:
        log.warning("delivery bookkeeping failed delivery_id=%s error=%s", delivery_id, exc)
        raise
    if outcome.status == DeliveryStatus.RETRY:
        raise self.retry(countdown=outcome.countdown)
    return {"delivery_id": delivery_id, "status": outcome.status, "reason": outcome.reason}


@shared_task(  # type: ignore[untyped-decorator]
    name=RECONCILE_TASK, bind=True, acks_late=True)
def reconcile(self: Task) -> dict[str, Any]:
    """One reconciler pass (run by Celery beat; see worker.beat)."""
    from worker.reconciler import reconcile_once, summary

    rt = runtime(self.app)
    return summary(reconcile_once(rt.db, rt.settings, self.app))
