"""The whole loop for end-to-end tests: the node (``python -m dicom_node`` on port 0,
``LISTENING port=`` handshake) made known to Orthanc as modality ``NODE`` once it
listens, and a real Celery worker on both queues, delivering to that Orthanc."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db.settings import Settings
from tests.support.node_process import start_listening
from tests.support.services import Orthanc
from tests.support.worker_process import WorkerProcess, settings_env


def loop_settings(make_settings: Callable[..., Settings], database_url: str,
                  orthanc: Orthanc, **extra: Any) -> Settings:
    """Settings for a node and a worker on real Redis with queues of their own, quick
    stability, delivering to ``orthanc``; the node takes port 0."""
    tag = uuid.uuid4().hex[:10]
    return make_settings(
        database_url=database_url, broker_url="redis://127.0.0.1:6379/0",
        inference_queue=f"inference-{tag}", delivery_queue=f"delivery-{tag}",
        port=0, bind_address="127.0.0.1", stable_seconds=1, scheduler_interval=0.3,
        pacs=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", input_size=224, **extra)


@dataclass
class RunningLoop:
    node_port: int
    node_log: Path
    worker: WorkerProcess

    def log_tail(self) -> str:
        """The ends of the node's and the worker's logs, for a failure message."""
        return (self.node_log.read_text(errors="replace")[-2000:]
                + self.worker.log()[-3000:])


@contextmanager
def running_loop(settings: Settings, orthanc: Orthanc, log_dir: Path) -> Iterator[RunningLoop]:
    """The node and a worker for ``settings``; both are stopped when the block ends."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(settings_env(settings))
    node_log = log_dir / "node.log"
    node, port = start_listening([sys.executable, "-m", "dicom_node"], node_log, env)
    worker = WorkerProcess(settings, [settings.inference_queue, settings.delivery_queue],
                           log_dir / "logs")
    try:
        orthanc.rest("PUT", "/modalities/NODE",
                     {"AET": settings.ae_title, "Host": "127.0.0.1", "Port": port})
        worker.start()
        yield RunningLoop(port, node_log, worker)
    finally:
        worker.stop()
        node.terminate()
        node.wait(timeout=30)
        if node.stdout is not None:
            node.stdout.close()
