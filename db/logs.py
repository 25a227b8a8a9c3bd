"""Logging set-up shared by every process entry: one line per event on stderr.

Each entry (``python -m dicom_node``, the Celery worker, ``cxr-triage``, ``python -m
trainer.retrain`` / ``evaluate`` / ``datasets build``) calls :func:`configure_logging` once
at start; library modules only ever call ``logging.getLogger(__name__)``.  Lines name
UIDs and ids, never patient names or IDs.
"""

from __future__ import annotations

import logging
import sys

#: The line of most processes.
LINE = "%(asctime)s %(levelname)s %(name)s %(message)s"
#: For processes that share one log with siblings (each line names its process).
LINE_WITH_PID = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"
#: The Celery worker's line (its pool processes have names).
LINE_WITH_PROCESS_NAME = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def configure_logging(level: str | int, fmt: str = LINE) -> None:
    """Log at ``level`` (a name such as ``"info"`` or a number) to stderr in ``fmt``."""
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
