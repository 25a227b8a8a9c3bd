"""A real ``celery -A worker worker`` subprocess configured through CXR_* variables."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from db.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env_value(value: Any) -> str:
    if isinstance(value, tuple):
        if value and isinstance(value[0], dict):
            return json.dumps(list(value))
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def settings_env(settings: Settings) -> dict[str, str]:
    """CXR_* variables that rebuild ``settings`` in another process (non-default fields)."""
    defaults = Settings()
    env: dict[str, str] = {}
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if value != getattr(defaults, f.name) and value is not None:
            env[f"CXR_{f.name.upper()}"] = _env_value(value)
    return env


class WorkerProcess:
    """One worker consuming ``queues``; logs go to a file the test can show on failure."""

    def __init__(self, settings: Settings, queues: list[str], log_dir: Path,
                 pool: str = "solo", extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.queues = queues
        self.pool = pool
        self.name = f"w{uuid.uuid4().hex[:8]}@test"
        self.log_path = log_dir / f"worker-{self.name.split('@')[0]}.log"
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 90.0) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        env.update(settings_env(self.settings))
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "celery", "-A", "worker", "worker",
               "-Q", ",".join(self.queues), f"--pool={self.pool}", "--concurrency=1",
               "-n", self.name, "--without-gossip", "--without-mingle",
               "--without-heartbeat", "--loglevel=INFO"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if wait_ready:
            self.wait_for_log("ready.", timeout)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"worker exited ({self.process.returncode}):\n"
                                     f"{self.log()[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"worker log never showed {text!r}:\n{self.log()[-4000:]}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: no chance to ack, requeue or clean up."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


class RedisServer:
    """A private ``redis-server`` that a test may stop and restart on the same port.

    Redis cannot take port 0, so the first start uses a port the OS had free, and new ones
    while redis-server reports it taken (bind, and retry on failure)."""

    def __init__(self, workdir: Path) -> None:
        self.port = 0
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        from tests.support.services import candidate_port

        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(5 if self.port == 0 else 1):
            port = self.port or candidate_port()
            if self._start_on(port):
                self.port = port
                return
        raise RuntimeError(f"redis-server found no free port: {self._log()[-1000:]}")

    def _log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _start_on(self, port: int) -> bool:
        """Start on ``port``: True once it accepts, False where the port was taken."""
        from tests.support.services import wait_until

        before = len(self._log())
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        # Its own "Ready" line, not whoever else may answer on that port.
        wait_until(lambda: process.poll() is not None
                   or "Ready to accept connections" in self._log()[before:],
                   20, what="redis-server up")
        if process.poll() is None:
            self.process = process
            return True
        if "Address already in use" in self._log()[before:]:
            return False
        raise RuntimeError(f"redis-server exited: {self._log()[before:][-1000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None
