"""The Celery application of a worker process.

This is the one place where a worker process reads its environment: settings are loaded
once at import, and every task receives them from :func:`runtime`.  The Celery
configuration itself (JSON only, ``acks_late`` with ``reject_on_worker_lost``, prefetch 1,
visibility timeout, queue routes) is shared with the listener through
:func:`db.broker.celery_config`.
"""

from __future__ import annotations

import logging
import sys

from celery import Celery
from celery.signals import setup_logging

from db.broker import make_celery
from db.settings import Settings, SettingsError, load_settings
from worker.beat import beat_schedule
from worker.metrics import install_celery_signals

log = logging.getLogger(__name__)

try:
    settings: Settings = load_settings()
except SettingsError as _exc:  # one line and exit 2, like every other entry point
    print(f"configuration error: {_exc}", file=sys.stderr)
    raise SystemExit(2) from None


def build_app(s: Settings) -> Celery:
    """A Celery app for ``s`` with the worker's tasks registered."""
    celery_app = make_celery(s, main="worker")
    celery_app.conf.update(
        include=["worker.tasks"],
        # A task that takes its time must not be redelivered while it still runs; the
        # broker's visibility timeout (settings.visibility_timeout) is the upper bound.
        task_time_limit=max(60, int(s.visibility_timeout * 0.9)),
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        beat_schedule=beat_schedule(s),
    )
    return celery_app


app: Celery = build_app(settings)
install_celery_signals(settings)  # each pool process serves /metrics when metrics_port is set


@setup_logging.connect  # type: ignore[untyped-decorator]
def _configure_logging(**_: object) -> None:
    """One line per event on stderr at ``settings.log_level``, for our loggers and
    Celery's alike (Celery skips its own set-up when this signal has a receiver)."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )


# Importing the tasks here registers them with ``app`` in every process that uses it,
# whether it is started by ``celery -A worker worker`` or imports ``worker.app``.
import worker.tasks  # noqa: E402,F401
