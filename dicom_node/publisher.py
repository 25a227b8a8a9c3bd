"""Publishing the analysis of a study to the broker, by task name.

The listener never imports ``worker``: it sends ``db.broker.ANALYSE_TASK`` through a Celery
client built from settings.  Publishing runs in the stability loop, never in a DICOM handler,
and fails fast (short connect and socket timeouts, no retry loop) so that a broker outage
only delays the next tick.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from celery import Celery
from sqlalchemy.orm import Session

from db import lifecycle
from db.broker import ANALYSE_TASK, make_celery
from db.errors import TransientError
from db.settings import Settings


class PublishError(TransientError):
    """The broker did not take the message; the study stays queued and is retried."""


class Publisher(Protocol):
    def publish(self, study_id: int, generation: int) -> None: ...

    def close(self) -> None: ...


def _fast_fail_options(settings: Settings, timeout: float) -> dict[str, Any]:
    options: dict[str, Any] = {
        "broker_connection_timeout": timeout,
        "broker_connection_retry": False,
        "broker_connection_max_retries": 0,
        "task_publish_retry": False,
    }
    if settings.effective_broker_url.startswith(("redis://", "rediss://", "unix://")):
        transport = dict(make_celery_transport_options(settings))
        transport.update(socket_connect_timeout=timeout, socket_timeout=timeout, max_retries=0)
        options["broker_transport_options"] = transport
    return options


def make_celery_transport_options(settings: Settings) -> dict[str, Any]:
    from db.broker import celery_config

    return dict(celery_config(settings)["broker_transport_options"])


def publish_analysis(s: Session, publisher: Publisher, study_id: int, generation: int,
                     now: datetime) -> None:
    """Send the analyse message of one study generation and record that it went: the one
    way to publish an analysis, used by the stability loop and the reconciler alike.
    Raises :class:`PublishError` (nothing recorded) when the broker does not take it."""
    publisher.publish(study_id, generation)
    lifecycle.mark_published(s, study_id, generation, now)


class AppPublisher:
    """A :class:`Publisher` over an existing Celery app (the worker's, in the reconciler)."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def publish(self, study_id: int, generation: int) -> None:
        try:
            self.app.send_task(ANALYSE_TASK, args=[study_id, generation],
                               queue=self.settings.inference_queue)
        except Exception as exc:  # kombu raises a family of connection errors
            raise PublishError(f"broker did not accept {ANALYSE_TASK} for study {study_id}: "
                               f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """The app belongs to its owner, which closes it."""


class CeleryPublisher:
    """Sends ``ANALYSE_TASK(study_id, generation)`` to ``settings.inference_queue``."""

    def __init__(self, settings: Settings, timeout: float = 2.0) -> None:
        self.settings = settings
        self.app: Celery = make_celery(settings, main="cxr-triage-listener")
        self.app.conf.update(_fast_fail_options(settings, timeout))

    def publish(self, study_id: int, generation: int) -> None:
        try:
            self.app.send_task(
                ANALYSE_TASK,
                args=[study_id, generation],
                queue=self.settings.inference_queue,
                retry=False,
            )
        except Exception as exc:  # kombu/redis raise many types; all mean "not published"
            raise PublishError(f"broker did not accept {ANALYSE_TASK} for study {study_id}: "
                               f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.app.close()
