"""SIGKILL mid-transfer: every acknowledged instance survives, nothing half-written stays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import build_context

from db.session import Database
from db.settings import Settings
from dicom_node import spool
from tests.support.dicom_factory import make_study_files
from tests.support.listener_peers import instance_rows, spool_files
from tests.support.services import wait_until

pytestmark = pytest.mark.slow
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


class NodeProcess:
    """``python -m dicom_node`` as a child process on a free port."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> None:
        cmd = [sys.executable, "-m", "dicom_node", "--port", "0", "--bind-address", "127.0.0.1",
               "--data-dir", str(self.settings.data_dir), "--database-url",
               self.settings.effective_database_url, "--min-free-mb", "1", "--no-stability"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log.open("a"),
                                     text=True, cwd=Path(__file__).resolve().parents[1])
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("LISTENING port="), f"node did not start: {line!r}"
        self.port = int(line.strip().split("=", 1)[1])

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def node_proc(settings: Settings, tmp_path: Path) -> Iterator[NodeProcess]:
    Database(settings).dispose()  # schema in place before the child starts
    node = NodeProcess(settings, tmp_path / "node.log")
    yield node
    node.stop()


def _send_until_killed(port: int, files: list[Path], acknowledged: list[str],
                       done: threading.Event) -> None:
    ae = AE(ae_title="STORESCU")
    ae.dimse_timeout = ae.network_timeout = 5  # notice the dead peer quickly
    ae.requested_contexts = [build_context(DX_STORAGE, [ExplicitVRLittleEndian])]
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
    try:
        for f in files:
            if not assoc.is_established:
                break
            try:
                rsp = assoc.send_c_store(pydicom.dcmread(f))
            except Exception:  # the peer was killed mid-message: pynetdicom raises variously
                break
            if "Status" in rsp and int(rsp.Status) == 0:
                acknowledged.append(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
    finally:
        try:
            if assoc.is_established:
                assoc.abort()
        finally:
            done.set()


def test_sigkill_mid_transfer_keeps_every_acknowledged_instance(
    node_proc: NodeProcess, settings: Settings, tmp_path: Path
) -> None:
    files = make_study_files(tmp_path / "in", n=150, rows=256, cols=256)
    node_proc.start()
    acknowledged: list[str] = []
    done = threading.Event()
    sender = threading.Thread(target=_send_until_killed,
                              args=(node_proc.port, files, acknowledged, done))
    sender.start()
    wait_until(lambda: len(acknowledged) >= 20 or done.is_set(), timeout=60,
               what="20 acknowledged stores")
    node_proc.kill9()
    sender.join(60)
    assert 20 <= len(acknowledged) < len(files), "the kill did not land mid-transfer"

    # Plant what a crash between write and rename leaves, then restart.
    study_dir = next(p for p in settings.spool_dir.iterdir() if p.is_dir())
    leftover = study_dir / f"{spool.TEMP_PREFIX}crash{spool.TEMP_SUFFIX}"
    leftover.write_bytes(b"half")
    node_proc.start()
    db = Database(settings, migrate=False)
    try:
        rows = instance_rows(db)
        for sop in acknowledged:
            assert sop in rows, f"acknowledged {sop} has no row"
            path = Path(rows[sop].path)
            assert path.is_file() and path.stat().st_size == rows[sop].size_bytes
            pydicom.dcmread(path)  # complete and readable
        names = [p.name for p in spool_files(settings.spool_dir)]
        assert not [n for n in names if spool.is_temp_name(n)], names
    finally:
        db.dispose()
