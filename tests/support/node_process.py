"""``python -m dicom_node`` as a child process on a free port (``--port 0`` plus the
``LISTENING port=`` handshake), for the kill -9 tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from db.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


class NodeProcess:
    """One listener process; ``start(*extra)`` passes more flags (``--listener-processes``)."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self, *extra: str) -> None:
        cmd = [sys.executable, "-m", "dicom_node", "--port", "0", "--bind-address", "127.0.0.1",
               "--data-dir", str(self.settings.data_dir), "--database-url",
               self.settings.effective_database_url, "--min-free-mb", "1", "--no-stability",
               *extra]
        self._close_pipe()  # a restart: the killed process's pipe is done with
        with self.log.open("a") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                         cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("LISTENING port="), f"node did not start: {line!r}"
        self.port = int(line.strip().split("=", 1)[1])

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def _close_pipe(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        self._close_pipe()
