"""``python -m dicom_node`` as a child process on a free port (port 0 plus the
``LISTENING port=`` handshake): :func:`start_listening`, and :class:`NodeProcess` for the
kill -9 tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from db.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def start_listening(cmd: list[str], log: Path,
                    env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    """Start ``cmd`` (a node on port 0), stderr to ``log``, and return it with the port
    from its ``LISTENING port=N`` line, printed once it accepts associations.  The caller
    closes ``proc.stdout`` when done with the process."""
    with log.open("a") as log_file:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                cwd=ROOT, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("LISTENING port="):
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        raise AssertionError(f"node did not start: {line!r}\n"
                             f"{log.read_text(errors='replace')[-2000:]}")
    return proc, int(line.strip().split("=", 1)[1])


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
        self.proc, self.port = start_listening(cmd, self.log)

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
