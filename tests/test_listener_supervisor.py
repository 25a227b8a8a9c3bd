"""Several listener processes on one port: kill -9 of a child and of the supervisor keeps
every acknowledged instance, and a duplicate sent to two processes at once stays one."""

from __future__ import annotations

import os
import signal
import threading
import time
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
from tests.support.listener_peers import assert_acknowledged_intact, instance_rows, spool_files
from tests.support.node_process import NodeProcess
from tests.support.services import port_open, wait_until

pytestmark = pytest.mark.slow
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
PROCESSES = 2


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class SupervisedNode(NodeProcess):
    """``python -m dicom_node --listener-processes 2``: a supervisor and its children."""

    def start(self, *extra: str) -> None:
        super().start("--listener-processes", str(PROCESSES), *extra)
        assert len(self.children()) == PROCESSES

    def children(self) -> list[int]:
        assert self.proc is not None
        return [pid for pid in _children(self.proc.pid) if _alive(pid)]


@pytest.fixture
def node(settings: Settings, tmp_path: Path) -> Iterator[SupervisedNode]:
    Database(settings).dispose()
    supervised = SupervisedNode(settings, tmp_path / "node.log")
    yield supervised
    supervised.stop()


def _associate(port: int) -> object:
    ae = AE(ae_title="STORESCU")
    ae.dimse_timeout = ae.network_timeout = 5  # notice a dead peer quickly
    ae.requested_contexts = [build_context(DX_STORAGE, [ExplicitVRLittleEndian])]
    return ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")


def _send(port: int, files: list[Path], acknowledged: list[str], lock: threading.Lock,
          failed: list[str] | None = None) -> None:
    """Send ``files`` on one association; record each SOP UID answered with Success."""
    assoc = _associate(port)
    try:
        for f in files:
            if not assoc.is_established:  # type: ignore[attr-defined]
                break
            try:
                rsp = assoc.send_c_store(pydicom.dcmread(f))  # type: ignore[attr-defined]
            except Exception:  # the peer was killed mid-message: pynetdicom raises variously
                break
            sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            if "Status" in rsp and int(rsp.Status) == 0:
                with lock:
                    acknowledged.append(sop)
            elif failed is not None:
                with lock:
                    failed.append(sop)
    finally:
        if assoc.is_established:  # type: ignore[attr-defined]
            assoc.release()  # type: ignore[attr-defined]


def test_sigkill_of_a_child_and_of_the_supervisor_keeps_every_acknowledged_instance(
    node: SupervisedNode, settings: Settings, tmp_path: Path
) -> None:
    files = make_study_files(tmp_path / "in", n=240, rows=256, cols=256)
    node.start()
    acknowledged: list[str] = []
    lock = threading.Lock()
    # Eight associations: the kernel spreads them over both children.
    senders = [threading.Thread(target=_send, args=(node.port, files[i::8], acknowledged, lock))
               for i in range(8)]
    for t in senders:
        t.start()
    wait_until(lambda: len(acknowledged) >= 20, timeout=120, what="20 acknowledged stores")
    victim = node.children()[0]
    os.kill(victim, signal.SIGKILL)
    # The supervisor restarts it, and removes its half-written files.
    wait_until(lambda: victim not in node.children() and len(node.children()) == PROCESSES,
               timeout=60, what="the killed child replaced")
    assert node.proc is not None and node.proc.poll() is None
    dead_prefix = spool.temp_prefix(victim)
    wait_until(lambda: not [p for p in spool_files(settings.spool_dir)
                            if p.name.startswith(dead_prefix)],
               timeout=30, what="the dead child's temporary files removed")
    before = len(acknowledged)
    wait_until(lambda: len(acknowledged) >= before + 10 or not any(t.is_alive() for t in senders),
               timeout=120, what="stores acknowledged after the restart")

    children = node.children()
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait(timeout=30)
    # The children die with their supervisor: nothing answers on the port any more.
    wait_until(lambda: not any(_alive(pid) for pid in children), timeout=30,
               what="children gone with the supervisor")
    for t in senders:
        t.join(60)
    assert 20 <= len(acknowledged) < len(files), "the kills did not land mid-transfer"
    # Polled, not asserted once: a lone connect to a free port of the ephemeral range can
    # meet itself (TCP simultaneous open), which is not the node answering.
    wait_until(lambda: not port_open("127.0.0.1", node.port), timeout=10,
               what="nothing listening on the node's port")

    # Plant what a crash between write and rename leaves, then restart.
    study_dir = next(p for p in settings.spool_dir.iterdir() if p.is_dir())
    (study_dir / f"{spool.TEMP_PREFIX}crash{spool.TEMP_SUFFIX}").write_bytes(b"half")
    node.start()
    assert_acknowledged_intact(settings, acknowledged)


def test_one_instance_sent_to_several_processes_at_once_is_stored_once(
    node: SupervisedNode, settings: Settings, tmp_path: Path
) -> None:
    files = make_study_files(tmp_path / "in", n=6, rows=64, cols=64)
    node.start()
    acknowledged: list[str] = []
    failed: list[str] = []
    lock = threading.Lock()
    senders = [threading.Thread(target=_send, args=(node.port, files, acknowledged, lock, failed))
               for _ in range(8)]
    start = time.monotonic()
    for t in senders:
        t.start()
    for t in senders:
        t.join(120)
    assert time.monotonic() - start < 120
    assert not failed
    assert len(acknowledged) == 8 * len(files)
    assert_acknowledged_intact(settings, acknowledged)
    db = Database(settings, migrate=False)
    try:
        rows = instance_rows(db)
    finally:
        db.dispose()
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert set(rows) == sops
    stored = [p for p in spool_files(settings.spool_dir) if not spool.is_temp_name(p.name)]
    assert sorted(p.stem for p in stored) == sorted(sops)
