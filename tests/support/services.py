"""Real peers for tests: PostgreSQL databases, Redis, Orthanc, ports.

Ports are never checked and then bound: our own servers take port 0 and report the port
they got (``LISTENING port=``); Orthanc, which cannot, is started on ports the OS had free
and started again on new ones when one has been taken since (:meth:`Orthanc.start`); a
destination that must refuse connections is a socket bound and held without listening
(:func:`refusing_port`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PG_ADMIN_URL = os.environ.get("CXR_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr"


def candidate_port() -> int:
    """A port the OS had free a moment ago.  Only for a server that cannot take port 0,
    and only where its start is retried on new ports when this one has been taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def refusing_port() -> Iterator[int]:
    """A local port where every connection is refused, for as long as the block runs: a
    socket bound to it without listening holds it, so no other process can take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def postgres_reachable() -> bool:
    return port_open("127.0.0.1", 5432)


def redis_reachable() -> bool:
    return port_open(REDIS_HOST, REDIS_PORT)


_TEMPLATE: str | None = None


def postgres_template() -> str:
    """A database migrated to head once per test process, which every test's database is
    cloned from (``CREATE DATABASE ... TEMPLATE``) instead of migrating each time."""
    global _TEMPLATE
    if _TEMPLATE is None:
        import tempfile

        import psycopg

        from db.session import Database
        from db.settings import load_settings

        name = f"cxr_tmpl_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
        with tempfile.TemporaryDirectory() as data_dir:
            db = Database(load_settings(env={}, overrides={"database_url": url,
                                                           "data_dir": data_dir}))
            db.dispose()  # a template must have no open connection when it is cloned
        _TEMPLATE = name
    return _TEMPLATE


def drop_postgres_template() -> None:
    global _TEMPLATE
    if _TEMPLATE is None:
        return
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{_TEMPLATE}" WITH (FORCE)')
    _TEMPLATE = None


@contextmanager
def fresh_postgres_database(*, migrated: bool = True) -> Iterator[str]:
    """A PostgreSQL database for one test, dropped afterwards: a clone of the migrated
    template (``migrated=True``) or an empty one."""
    import psycopg

    admin = PG_ADMIN_URL
    name = f"cxr_test_{uuid.uuid4().hex[:12]}"
    template = f' TEMPLATE "{postgres_template()}"' if migrated else ""
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{template}')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.1, what: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or predicate}; last={last!r}"
    )


#: What Orthanc logs before it exits when one of its ports is taken.
ORTHANC_PORT_TAKEN = "privileged or already in use"


class PortTakenError(RuntimeError):
    """A server could not bind a port that another process took first."""


@dataclass
class Orthanc:
    """A real Orthanc server with a temporary configuration (``workdir/orthanc.json``) and
    storage; its ports are chosen by :meth:`start`."""

    aet: str
    workdir: Path
    http_port: int = 0
    dicom_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rest(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
             timeout: float = 60) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read()
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def get(self, path: str) -> Any:
        return self.rest("GET", path)

    def post(self, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        return self.rest("POST", path, body=body, raw=raw)

    def upload(self, path: Path) -> Any:
        return self.post("/instances", raw=path.read_bytes())

    def start(self, attempts: int = 5) -> None:
        """Start on two ports the OS had free; Orthanc cannot take port 0, so where one has
        been taken since, Orthanc exits saying so and is started again on new ones.  A
        restart keeps the ports it had, since its peers know them."""
        if self.http_port and self.dicom_port:
            self._start_once()
            return
        for _ in range(attempts):
            self.http_port = candidate_port()
            self.dicom_port = candidate_port()
            if self.dicom_port == self.http_port:
                continue
            config_path = self.workdir / "orthanc.json"
            config = json.loads(config_path.read_text())
            config.update({"HttpPort": self.http_port, "DicomPort": self.dicom_port})
            config_path.write_text(json.dumps(config, indent=2))
            try:
                self._start_once()
                return
            except PortTakenError:
                continue
        raise RuntimeError(f"Orthanc found no free ports in {attempts} attempts")

    def _start_once(self) -> None:
        log_path = self.workdir / "orthanc.log"
        log_start = log_path.stat().st_size if log_path.exists() else 0
        # The child keeps its own copy of the descriptor; ours is closed at once.
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["Orthanc", str(self.workdir / "orthanc.json")], stdout=log, stderr=log,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                with open(log_path, "rb") as log:
                    log.seek(log_start)
                    text = log.read().decode(errors="replace")
                if ORTHANC_PORT_TAKEN in text:
                    raise PortTakenError(text[-500:])
                raise RuntimeError(f"Orthanc exited: {text[-2000:]}")
            try:
                # Ours, not whoever else answers on that port while ours gives up.
                if self.rest("GET", "/system", timeout=2).get("DicomPort") == self.dicom_port:
                    return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError("Orthanc did not start within 60 s")

    def stop(self, graceful: bool = True) -> None:
        """Stop the server; ``graceful=False`` kills it (teardown of throwaway storage)."""
        if self.process and self.process.poll() is None and not graceful:
            self.process.kill()
            self.process.wait()
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def orthanc_available() -> bool:
    return shutil.which("Orthanc") is not None


def make_orthanc(workdir: Path, modalities: dict[str, list[Any]] | None = None,
                 aet: str = "ORTHANC") -> Orthanc:
    workdir.mkdir(parents=True, exist_ok=True)
    orthanc = Orthanc(aet=aet, workdir=workdir)
    config = {
        "Name": "cxr-test",
        "StorageDirectory": str(workdir / "db"),
        "IndexDirectory": str(workdir / "db"),
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": True,
        "DicomModalities": modalities or {},
        "Plugins": [],
        "StableAge": 1,
        "HttpsVerifyPeers": False,
        "ConcurrentJobs": 2,
        # A freshly started peer on a loaded 2-core CI machine can take more than the
        # default 10 s to answer its first association.
        "DicomScuTimeout": 60,
        "SaveJobs": False,
    }
    (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
    return orthanc
