"""Celery configuration shared by every process, and the names of the tasks.

The listener publishes by task name (it never imports ``worker``); the worker registers
tasks under the same names.  Only JSON is ever serialised.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from db.settings import Settings

ANALYSE_TASK = "cxr.analyse_study"
DELIVER_TASK = "cxr.deliver"
RECONCILE_TASK = "cxr.reconcile"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from cxr-triage settings."""
    transport_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if settings.uses_embedded_broker:
        # kombu's filesystem transport keeps every message as a file under the data dir,
        # so queued work survives a restart of every process on a single host.
        folder = str(settings.broker_dir / "in")
        transport_options = {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "processed_folder": str(settings.broker_dir / "processed"),
            "control_folder": str(settings.broker_dir / "control"),
            "store_processed": False,
        }
    return {
        "broker_url": settings.effective_broker_url,
        "result_backend": settings.result_backend or None,
        "task_ignore_result": not settings.result_backend,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.inference_queue,
        "task_routes": {
            ANALYSE_TASK: {"queue": settings.inference_queue},
            DELIVER_TASK: {"queue": settings.delivery_queue},
            RECONCILE_TASK: {"queue": settings.delivery_queue},
        },
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.2,
                                      "interval_step": 0.5, "interval_max": 1.0},
        "worker_hijack_root_logger": False,
        "enable_utc": True,
        "timezone": "UTC",
    }


def make_celery(settings: Settings, main: str = "cxr-triage") -> Celery:
    """A Celery app configured from settings, with no tasks registered."""
    if settings.uses_embedded_broker:
        settings.ensure_dirs()
    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app
