"""The worker process's entry: read the environment once, build the app, wire logging.

``celery -A worker worker`` reaches this module through ``worker.app`` (a lazy attribute
of the ``worker`` package), so only a Celery process, or code that asks for ``worker.app``
by name, reads the environment.  Everything else uses :func:`worker.app.create_app`.
"""

from __future__ import annotations

import sys

from celery import Celery
from celery.signals import setup_logging

from db.logs import LINE_WITH_PROCESS_NAME, configure_logging
from db.settings import Settings, SettingsError, load_settings
from worker.app import create_app
from worker.metrics import install_celery_signals

try:
    settings: Settings = load_settings()
except SettingsError as _exc:  # one line and exit 2, like every other entry point
    print(f"configuration error: {_exc}", file=sys.stderr)
    raise SystemExit(2) from None

app: Celery = create_app(settings)
install_celery_signals(settings)  # each pool process serves /metrics when metrics_port is set


@setup_logging.connect  # type: ignore[untyped-decorator]
def _configure_logging(**_: object) -> None:
    """One line per event on stderr at ``settings.log_level``, for our loggers and
    Celery's alike (Celery skips its own set-up when this signal has a receiver)."""
    configure_logging(settings.log_level, LINE_WITH_PROCESS_NAME)
