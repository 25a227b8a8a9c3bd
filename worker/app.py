"""The Celery application factory of a worker process.

:func:`create_app` builds a Celery app for the settings it is given and builds nothing at
import, so tests pass their own settings and call the tasks in process (Flask's
``create_app(test_config)``).  The process entry that reads the environment is
:mod:`worker.entry`, which ``celery -A worker`` reaches through the ``worker`` package's
lazy ``app`` attribute.  The Celery
configuration itself (JSON only, ``acks_late`` with ``reject_on_worker_lost``, prefetch 1,
visibility timeout, queue routes) is shared with the listener through
:func:`db.broker.celery_config`.

Retry policy is declared on the tasks (``autoretry_for``, ``retry_backoff``) with one
budget set here from the settings: a study is tried at most ``settings.max_analysis_attempts``
times, so an analysis retries infrastructure trouble that many times less one, after 2 s,
4 s, ... at most 300 s; a redelivery after a lost worker spends the same budget (counted
by the claim, :func:`worker.analysis.claim`, which Celery's retry count cannot see).
Deliveries retry infrastructure trouble without a count, since their deadline
(``worker.delivery``) bounds them.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from db.broker import ANALYSE_TASK, DELIVER_TASK, RECONCILE_TASK, make_celery
from db.settings import Settings
from worker.beat import beat_schedule


def task_policy(s: Settings) -> dict[str, dict[str, Any]]:
    """Per-task retry counts (Celery task annotations) from the settings: the one budget.

    Which errors retry and the backoff are declared on the tasks
    (:data:`worker.tasks.RETRY_POLICY`)."""
    return {
        ANALYSE_TASK: {"max_retries": s.max_analysis_attempts - 1},
        DELIVER_TASK: {"max_retries": None},
        RECONCILE_TASK: {"max_retries": 0},
    }


def create_app(s: Settings) -> Celery:
    """A Celery app for ``s`` with the worker's tasks registered; reads no environment."""
    from worker.tasks import bind_settings  # also defines the shared tasks every app picks up

    celery_app = make_celery(s, main="worker")
    celery_app.conf.update(
        include=["worker.tasks"],
        task_annotations=task_policy(s),
        # A task that takes its time must not be redelivered while it still runs; the
        # broker's visibility timeout (settings.visibility_timeout) is the upper bound.
        task_time_limit=max(60, int(s.visibility_timeout * 0.9)),
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        beat_schedule=beat_schedule(s),
    )
    bind_settings(celery_app, s)
    celery_app.finalize(auto=True)
    return celery_app
