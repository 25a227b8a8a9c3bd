"""Celery beat schedule for the reconciler.

Run ``celery -A worker beat`` beside the workers (one per installation).  Each beat tick
publishes ``cxr.reconcile`` on the delivery queue; a pass is cheap and idempotent, so a
second beat by mistake does no harm.
"""

from __future__ import annotations

from typing import Any

from db.broker import RECONCILE_TASK
from db.settings import Settings
from worker.reconciler import reconcile_interval


def beat_schedule(settings: Settings) -> dict[str, Any]:
    return {
        "reconcile": {
            "task": RECONCILE_TASK,
            "schedule": reconcile_interval(settings),
            "options": {"queue": settings.delivery_queue,
                        "expires": reconcile_interval(settings)},
        }
    }
