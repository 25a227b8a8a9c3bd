"""The worker floor: the Celery app and its thin tasks, analysis orchestration, delivery,
the reconciler and the operator CLI.

``celery -A worker worker`` looks up ``worker.app``.  The app is built lazily, on first
access, by :mod:`worker.entry` (the process entry, which reads the environment); library
modules of this package (``worker.analysis``, ``worker.delivery``, ...) stay importable by
tests and by the CLI without a process-wide app being configured behind their back, and
tests build their own with :func:`worker.app.create_app`.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.entry import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
