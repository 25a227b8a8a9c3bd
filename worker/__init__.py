"""The worker floor: the Celery app and its thin tasks, analysis orchestration, delivery,
the reconciler and the operator CLI.

``celery -A worker worker`` looks up ``worker.app``.  The app is built lazily, on first
access, because building it reads the environment: library modules of this package
(``worker.analysis``, ``worker.delivery``, ...) must stay importable by tests and by the
CLI without a process-wide app being configured behind their back.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
