"""The metrics registry shared by every process: the listener's Prometheus counters and
the label helper.

They live on the foundation floor so that the listener (which never imports ``worker``) and
the worker register each metric once; ``worker.metrics`` re-exports them.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, start_http_server

log = logging.getLogger(__name__)

INSTANCES_RECEIVED = Counter(
    "cxr_instances_received", "DICOM instances stored by the listener", ["modality"]
)
INSTANCES_REJECTED = Counter(
    "cxr_instances_rejected", "DICOM instances or associations the listener refused, by reason",
    ["reason"],
)

#: Bounded label values, so that a bug or a hostile peer cannot explode cardinality.
MAX_LABEL_LEN = 48


def label(value: str | None) -> str:
    text = (value or "unknown").strip() or "unknown"
    return text[:MAX_LABEL_LEN]


def instance_received(modality: str | None = None) -> None:
    """The listener stored an instance durably."""
    INSTANCES_RECEIVED.labels(modality=label(modality)).inc()


def instance_rejected(reason: str) -> None:
    """The listener refused an instance or an association; ``reason`` is a short fixed
    word: ``unreadable``, ``invalid`` (bad UID, SOP class outside its context),
    ``disk_full``, ``write_failed``, ``spool_missing``, ``record_failed``, ``caller``."""
    INSTANCES_REJECTED.labels(reason=label(reason)).inc()


def serve(port: int, addr: str = "0.0.0.0") -> int:
    """Serve ``/metrics`` from the listener process; returns the bound port (0: off)."""
    if not port:
        return 0
    server, _thread = start_http_server(port, addr=addr)
    bound = int(server.server_address[1])
    log.info("metrics endpoint listening port=%d", bound)
    return bound
