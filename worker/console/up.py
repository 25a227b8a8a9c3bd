"""``cxr-triage up``: every process of a single-host installation, supervised.

The children are the same commands an operator would run by hand or under systemd
(``python -m dicom_node``, ``celery -A worker worker``, ``celery -A worker beat``,
``cxr-triage web``), so what runs here is what runs in production.  A child that dies is
restarted with exponential backoff; Ctrl-C or SIGTERM stops them all, gracefully first.
Each child gets its own session, so the supervisor alone decides when it stops.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db.settings import Settings

log = logging.getLogger(__name__)

GRACE_SECONDS = 20.0
BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
HEALTHY_AFTER = 60.0  # a child that ran this long has its backoff reset
QUICK_EXIT = 10.0  # a child that dies sooner than this after starting did not really start
START_LIMIT = 5  # that many quick exits in a row: a configuration fault, give up (as systemd)
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class UpOptions:
    bootstrap: Path | None = None
    web: bool = True
    worker: bool = True
    web_host: str = "127.0.0.1"


@dataclass
class Child:
    """One supervised process and its restart bookkeeping."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    quick_exits: int = 0
    next_start: float = 0.0
    pids: list[int] = field(default_factory=list)

    def start(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(self.argv, env=env, start_new_session=True)
        self.started_at = time.monotonic()
        self.pids.append(self.process.pid)
        log.info("child started name=%s pid=%d", self.name, self.process.pid)
        print(f"CHILD {self.name} pid={self.process.pid}", flush=True)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signum)  # the child's whole group: pool processes too
        except ProcessLookupError:
            pass


def children_for(settings: Settings, options: UpOptions) -> list[Child]:
    """The commands of a single-host installation."""
    py = sys.executable
    queues = f"{settings.inference_queue},{settings.delivery_queue}"
    out = [Child("listener", [py, "-m", "dicom_node"])]
    if options.worker:
        out.append(Child("worker", [
            py, "-m", "celery", "-A", "worker", "worker", "-Q", queues, "--pool=solo",
            "-n", f"cxr-up-{os.getpid()}@%h", f"--loglevel={settings.log_level}",
            "--without-gossip", "--without-mingle",
        ]))
        out.append(Child("scheduler", [
            py, "-m", "celery", "-A", "worker", "beat", f"--loglevel={settings.log_level}",
            "--schedule", str(settings.data_dir.resolve() / "celerybeat-schedule"),
        ]))
    if options.web:
        out.append(Child("web", [py, "-m", "worker.console.cli", "web", "--host", options.web_host,
                                 "--port", str(settings.web_port)]))
    return out


def child_env(settings: Settings) -> dict[str, str]:
    """The parent's environment with the data dir made absolute, so children agree."""
    env = dict(os.environ)
    env["CXR_DATA_DIR"] = str(settings.data_dir.resolve())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def no_model_advice(bootstrap_hint: str = "../shared/data/cxr") -> str:
    return (
        "No production model is registered, so studies will be received and queued but not "
        "scored.\nGet one in either of two ways:\n"
        f"  cxr-triage up --bootstrap {bootstrap_hint}    "
        "(trains a first model from a labelled folder: labels.csv + images)\n"
        "  cxr-triage model register PATH/TO/checkpoint.pt --promote"
    )


def has_production_model(settings: Settings) -> bool:
    from db.session import Database
    from trainer.registry import production_model

    db = Database(settings)  # also brings the schema to head before any child starts
    try:
        with db.session() as s:
            return production_model(s) is not None
    finally:
        db.dispose()


def bootstrap_model(settings: Settings, dataset: Path) -> int:
    """Train and promote a first model with the nightly trainer; its progress shows."""
    if not (dataset / "labels.csv").is_file():
        print(f"error: {dataset} has no labels.csv; --bootstrap needs a labelled folder",
              file=sys.stderr)
        return 1
    print(f"Training a first model from {dataset} (this takes a while on CPU) ...", flush=True)
    cmd = [sys.executable, "-m", "trainer.retrain", "--dataset", str(dataset.resolve()),
           "--force"]
    rc = subprocess.call(cmd, env=child_env(settings))
    if rc != 0:
        print(f"error: bootstrap training exited with status {rc}", file=sys.stderr)
    return rc


class Supervisor:
    """Keeps children alive until asked to stop."""

    def __init__(self, children: list[Child], env: dict[str, str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.children = children
        self.env = env
        self.clock = clock
        self.stopping = threading.Event()
        self.gave_up: str | None = None  # why the group stopped by itself, if it did

    def request_stop(self, signum: int = signal.SIGTERM, _frame: Any = None) -> None:
        log.info("stop requested signal=%d", signum)
        self.stopping.set()

    def backoff(self, child: Child) -> float:
        return float(min(BACKOFF_MAX, BACKOFF_START * 2 ** max(0, child.restarts - 1)))

    def tick(self) -> None:
        now = self.clock()
        for child in self.children:
            if child.process is None:
                if now >= child.next_start:
                    child.start(self.env)
                continue
            rc = child.process.poll()
            if rc is None:
                if child.restarts and now - child.started_at > HEALTHY_AFTER:
                    child.restarts = 0
                continue
            child.restarts += 1
            quick = now - child.started_at < QUICK_EXIT
            child.quick_exits = child.quick_exits + 1 if quick else 0
            if child.quick_exits >= START_LIMIT:
                self.gave_up = (f"{child.name} exited with status {rc} within "
                                f"{QUICK_EXIT:.0f} s of starting {START_LIMIT} times in a row; "
                                "giving up (check its log lines above and the settings)")
                log.error("child crash loop name=%s rc=%s quick_exits=%d", child.name, rc,
                          child.quick_exits)
                print(f"error: {self.gave_up}", file=sys.stderr, flush=True)
                child.process = None
                self.stopping.set()
                return
            delay = self.backoff(child)
            log.warning("child exited name=%s pid=%d rc=%s restart_in=%.1fs", child.name,
                        child.process.pid, rc, delay)
            print(f"{child.name} exited with status {rc}; restarting in {delay:.0f} s",
                  file=sys.stderr, flush=True)
            child.process = None
            child.next_start = now + delay

    def run(self) -> None:
        while not self.stopping.is_set():
            self.tick()
            self.stopping.wait(POLL_SECONDS)
        self.shutdown()

    def shutdown(self) -> None:
        for child in self.children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("child did not stop in time name=%s pid=%d; killing", child.name,
                            child.process.pid)
                child.signal(signal.SIGKILL)
                child.process.wait()
            log.info("child stopped name=%s rc=%s", child.name, child.process.returncode)
        print("all processes stopped", flush=True)


def run_up(settings: Settings, options: UpOptions) -> int:
    settings.ensure_dirs()
    if not has_production_model(settings):
        if options.bootstrap is not None:
            rc = bootstrap_model(settings, options.bootstrap)
            if rc != 0:
                return rc
            if not has_production_model(settings):
                print("error: training finished but promoted no model (below the promotion "
                      "floor, or awaiting `cxr-triage model approve VERSION`); "
                      "`cxr-triage models` says why, the report is under "
                      f"{settings.reports_dir}", file=sys.stderr)
                return 1
        else:
            print(no_model_advice(), flush=True)
    supervisor = Supervisor(children_for(settings, options), child_env(settings))
    signal.signal(signal.SIGINT, supervisor.request_stop)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    print(f"cxr-triage up: DICOM {settings.ae_title}@{settings.bind_address}:{settings.port}, "
          f"data in {settings.data_dir.resolve()}"
          + (f", web page http://{options.web_host}:{settings.web_port}/" if options.web else "")
          + "; Ctrl-C stops everything", flush=True)
    supervisor.run()
    return 1 if supervisor.gave_up else 0
