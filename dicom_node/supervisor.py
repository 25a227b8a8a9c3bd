"""Several listener processes on one port, under one supervisor.

One Python process decodes PDUs, parses headers and hashes under one interpreter lock, so
with several senders the node cannot use more than one core.  With
``listener_processes > 1`` (``CXR_LISTENER_PROCESSES``), ``python -m dicom_node`` becomes a
supervisor that:

- resolves the port (port 0: a free one) and holds it with a bound, never-listening
  ``SO_REUSEPORT`` socket, so that the port stays ours while children restart;
- removes half-written spool files of a previous run before any child starts, and a dead
  child's own half-written files after it died (temporary names carry the writer's pid);
- starts the children (``python -m dicom_node`` with ``--listener-child``); each binds the
  same port with ``SO_REUSEPORT`` and the kernel spreads new connections over them;
- restarts a child that dies, forwards SIGTERM/SIGINT to all of them, and runs the single
  stability loop (queueing of quiet studies) itself, so that it runs in exactly one process;
- serves the metrics endpoint for all processes (Prometheus multiprocess mode).

Children ask the kernel to kill them when the supervisor dies (``PR_SET_PDEATHSIG``), so a
``kill -9`` of the supervisor does not leave orphans answering on the port.  The spool and
the database are shared the same way as between the threads of one process: the spool by
atomic, link-based publishing, the database by its own locking plus the retry on a
conflicting insert in :func:`dicom_node.ingest.ingest`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db.session import Database
from db.settings import Settings
from dicom_node import spool

log = logging.getLogger(__name__)

CHILD_FLAG = "--listener-child"
_PR_SET_PDEATHSIG = 1
#: A child that dies sooner than this after its start counts as a failed start.
_QUICK_DEATH_S = 5.0
_MAX_BACKOFF_S = 30.0
_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 30.0


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; no-op elsewhere).

    A child left running after a ``kill -9`` of its supervisor would keep answering on the
    port with nobody to restart or stop it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError) as exc:
        log.warning("cannot ask to die with the supervisor: %s", exc)
        return
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os._exit(1)


def reserve_port(bind_address: str, port: int) -> socket.socket:
    """A bound, non-listening ``SO_REUSEPORT`` socket: fixes the port (0: a free one)
    without receiving connections; the children bind the same port beside it."""
    family = socket.AF_INET6 if ":" in bind_address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((bind_address, port))
    except OSError:
        sock.close()
        raise
    return sock


def _child_command(argv: Sequence[str], port: int) -> list[str]:
    # Later flags win with argparse, so the resolved port and the child role override
    # whatever the operator passed; every other flag (config, URLs, limits) carries over.
    return [sys.executable, "-m", "dicom_node", *argv, "--port", str(port), "--no-stability",
            CHILD_FLAG]


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[str] | None = None
    started: float = 0.0
    failures: int = 0
    not_before: float = 0.0
    pids: list[int] = field(default_factory=list)


class Supervisor:
    """Starts ``settings.listener_processes`` children on one port and keeps them running."""

    def __init__(self, settings: Settings, argv: Sequence[str], *, run_stability: bool) -> None:
        self.settings = settings
        self.argv = list(argv)
        self.run_stability = run_stability
        self.stopping = threading.Event()
        self.children = [_Child(i) for i in range(settings.listener_processes)]
        self.port = 0
        self._reservation: socket.socket | None = None
        self._metrics_dir: Path | None = None
        self._env: dict[str, str] = dict(os.environ)

    # ----- start-up -----------------------------------------------------------------
    def _prepare(self) -> None:
        self.settings.ensure_dirs()
        Database(self.settings).dispose()  # migrate once, before any child connects
        removed = spool.remove_stale_temp_files(self.settings.spool_dir)
        if removed:
            log.warning("removed %d half-written spool files from a previous run", len(removed))
        self._reservation = reserve_port(self.settings.bind_address, self.settings.port)
        self.port = int(self._reservation.getsockname()[1])
        if self.settings.metrics_port:
            self._metrics_dir = self.settings.data_dir / "metrics-listener"
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir.mkdir(parents=True)
            self._env["PROMETHEUS_MULTIPROC_DIR"] = str(self._metrics_dir)

    def _spawn(self, child: _Child) -> None:
        proc = subprocess.Popen(_child_command(self.argv, self.port), stdout=subprocess.PIPE,
                                text=True, env=self._env)
        child.proc = proc
        child.started = time.monotonic()
        child.pids.append(proc.pid)
        assert proc.stdout is not None
        line = _readline(proc, _START_TIMEOUT_S)
        if not line.startswith("LISTENING port="):
            proc.kill()
            proc.wait()
            raise RuntimeError(f"listener child {child.index} did not start: {line!r}")
        log.info("listener child started index=%d pid=%d port=%d", child.index, proc.pid,
                 self.port)

    def start(self) -> None:
        self._prepare()
        try:
            for child in self.children:
                self._spawn(child)
        except BaseException:
            self.stop()
            raise

    # ----- running ------------------------------------------------------------------
    def _reap(self, child: _Child) -> None:
        proc = child.proc
        if proc is None or proc.poll() is None:
            return
        code = proc.returncode
        child.proc = None
        if self.stopping.is_set():
            return
        lived = time.monotonic() - child.started
        child.failures = child.failures + 1 if lived < _QUICK_DEATH_S else 0
        backoff = min(_MAX_BACKOFF_S, 0.5 * 2 ** max(0, child.failures - 1))
        child.not_before = time.monotonic() + (backoff if child.failures else 0.0)
        removed = spool.remove_temp_files_of(self.settings.spool_dir, proc.pid)
        if self._metrics_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                proc.pid, str(self._metrics_dir))
        log.error("listener child died index=%d pid=%d exit=%s seconds=%.1f "
                  "half_written_removed=%d restart_in=%.1fs", child.index, proc.pid, code,
                  lived, len(removed), max(0.0, child.not_before - time.monotonic()))

    def supervise(self, poll_s: float = 0.2) -> None:
        """Restart dead children until :attr:`stopping` is set."""
        while not self.stopping.wait(poll_s):
            for child in self.children:
                self._reap(child)
                if child.proc is None and not self.stopping.is_set() \
                        and time.monotonic() >= child.not_before:
                    try:
                        self._spawn(child)
                    except (OSError, RuntimeError) as exc:
                        child.failures += 1
                        child.not_before = time.monotonic() + min(
                            _MAX_BACKOFF_S, 0.5 * 2 ** child.failures)
                        log.error("listener child restart failed index=%d reason=%s",
                                  child.index, exc)

    def child_pids(self) -> list[int]:
        return [c.proc.pid for c in self.children if c.proc is not None]

    def stop(self) -> None:
        """SIGTERM every child, wait, SIGKILL what is left, release the port."""
        self.stopping.set()
        live = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("listener child pid=%d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None
        log.info("listener supervisor stopped port=%d children=%d", self.port,
                 len(self.children))

    def serve_metrics(self) -> int:
        """The metrics endpoint, aggregated over every child (0: off)."""
        if not self.settings.metrics_port or self._metrics_dir is None:
            return 0
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, path=str(self._metrics_dir))
        server, _thread = start_http_server(self.settings.metrics_port, registry=registry)
        return int(server.server_address[1])


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """The child's first stdout line, or "" if it exits or stays silent for ``timeout``."""
    result: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        result.append(proc.stdout.readline())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


def run_supervisor(settings: Settings, argv: Sequence[str], *, run_stability: bool,
                   stop: threading.Event) -> int:
    """Run the supervisor until ``stop`` is set; prints ``LISTENING port=N`` once ready."""
    supervisor = Supervisor(settings, argv, run_stability=run_stability)
    supervisor.start()
    loop: Any = None
    publisher: Any = None
    database: Database | None = None
    try:
        if run_stability:
            from dicom_node.publisher import CeleryPublisher
            from dicom_node.stability import StabilityLoop

            database = Database(settings, migrate=False)
            publisher = CeleryPublisher(settings)
            loop = StabilityLoop(database, settings, publisher)
            loop.start()
        supervisor.serve_metrics()
        log.info("listener supervisor started port=%d processes=%d stability=%s",
                 supervisor.port, len(supervisor.children), run_stability)
        print(f"LISTENING port={supervisor.port}", flush=True)

        def forward_stop() -> None:
            stop.wait()
            supervisor.stopping.set()

        threading.Thread(target=forward_stop, name="supervisor-stop", daemon=True).start()
        supervisor.supervise()
    finally:
        if loop is not None:
            loop.stop()
        supervisor.stop()
        if publisher is not None:
            publisher.close()
        if database is not None:
            database.dispose()
    return 0
