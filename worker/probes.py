"""Questions put to the broker: which workers answer, and how deep each queue is.

Health asks whether an inference and a delivery worker are alive; the metrics page asks
how many messages wait in each Celery queue.  Both go through the broker that the
pipeline uses, so a worker that cannot reach it, or a broker nobody consumes from, shows.

A worker's answer to ``inspect().active_queues()`` is its reply to a remote-control
broadcast, the same channel as ``celery inspect ping``; it also names the queues that
worker consumes, which a plain ping does not, so one round trip tells which kind of
worker answered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kombu.exceptions import OperationalError

from db.broker import make_celery
from db.settings import Settings

log = logging.getLogger(__name__)


class BrokerUnreachableError(RuntimeError):
    """The broker did not answer: our infrastructure's fault."""


def workers_by_queue(settings: Settings, timeout: float | None = None) -> dict[str, list[str]]:
    """Queue name -> names of the workers that answered the broadcast and consume it."""
    app = make_celery(settings, main="cxr-triage-probe")
    try:
        inspector = app.control.inspect(timeout=timeout or settings.health_ping_timeout)
        replies: dict[str, Any] = inspector.active_queues() or {}
    except (OSError, OperationalError) as exc:
        raise BrokerUnreachableError(f"broker unreachable: {exc}") from exc
    finally:
        app.close()
    out: dict[str, list[str]] = {}
    for worker, queues in sorted(replies.items()):
        for queue in queues or []:
            name = queue.get("name") if isinstance(queue, dict) else None
            if isinstance(name, str):
                out.setdefault(name, []).append(str(worker))
    return out


def queue_depths(settings: Settings, queues: Iterable[str] | None = None) -> dict[str, int]:
    """Messages waiting (not yet delivered to a worker) in each queue; a queue the broker
    has never seen counts 0."""
    from amqp.exceptions import NotFound
    from kombu.exceptions import ChannelError

    names = list(queues) if queues is not None else [settings.inference_queue,
                                                      settings.delivery_queue]
    app = make_celery(settings, main="cxr-triage-probe")
    depths: dict[str, int] = {}
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=settings.health_ping_timeout)
            channel = conn.default_channel
            for name in names:
                try:
                    depths[name] = int(channel.queue_declare(queue=name, passive=True)
                                       .message_count)
                except (ChannelError, NotFound):
                    depths[name] = 0
    except (OSError, OperationalError) as exc:
        raise BrokerUnreachableError(f"broker unreachable: {exc}") from exc
    finally:
        app.close()
    return depths


__all__ = ["BrokerUnreachableError", "queue_depths", "workers_by_queue"]
