"""Faults of the listener process: SIGKILL mid-transfer (every acknowledged instance
survives, nothing half-written stays), peers that stall mid-PDU, a spool that vanishes."""

from __future__ import annotations

import socket
import struct
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
from tests.support.listener_peers import (
    assert_acknowledged_intact,
    instance_rows,
    send_files_pynetdicom,
)
from tests.support.node_process import NodeProcess
from tests.support.services import wait_until

pytestmark = pytest.mark.slow
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


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
    assert_acknowledged_intact(settings, acknowledged)


def _stalled_peer(port: int) -> socket.socket:
    """A peer that starts an A-ASSOCIATE-RQ PDU of 200 bytes, sends 20, and goes quiet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"\x01\x00" + struct.pack(">I", 200) + b"\x00\x01" + b"\x00" * 18)
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def test_peers_stalled_mid_pdu_lose_their_slots_within_the_network_timeout(
    node_proc: NodeProcess, tmp_path: Path
) -> None:
    timeout = 2.0
    node_proc.start("--max-associations", "2", "--network-timeout", str(timeout),
                    "--acse-timeout", "1")
    stalled = [_stalled_peer(node_proc.port) for _ in range(2)]
    started = time.monotonic()
    try:
        for sock in stalled:
            assert _closed_by_peer(sock), "the listener kept a stalled peer's connection"
        elapsed = time.monotonic() - started
        assert elapsed <= timeout + 2.0, f"slots came back after {elapsed:.1f} s"
        # The association threads end once their ACSE wait (at most the network timeout,
        # see the settings) sees the connection gone.
        time.sleep(1.5)
        f = make_study_files(tmp_path / "in", n=1)
        assert send_files_pynetdicom(node_proc.port, f, ExplicitVRLittleEndian,
                                     DX_STORAGE) == [0]
        assert time.monotonic() - started <= 2 * timeout + 2.0
    finally:
        for sock in stalled:
            sock.close()
    assert node_proc.proc is not None and node_proc.proc.poll() is None


def test_a_peer_stalled_inside_a_p_data_pdu_after_association_loses_its_slot(
    node_proc: NodeProcess, tmp_path: Path
) -> None:
    timeout = 2.0
    node_proc.start("--max-associations", "1", "--network-timeout", str(timeout),
                    "--acse-timeout", "1")
    ae = AE(ae_title="STORESCU")
    ae.requested_contexts = [build_context(DX_STORAGE, [ExplicitVRLittleEndian])]
    assoc = ae.associate("127.0.0.1", node_proc.port, ae_title="CXR_TRIAGE")
    assert assoc.is_established
    # A P-DATA-TF PDU that announces 4000 bytes, of which 10 arrive; then silence.
    raw = assoc.dul.socket.socket  # type: ignore[union-attr]
    started = time.monotonic()
    raw.sendall(b"\x04\x00" + struct.pack(">I", 4000) + b"\x00" * 10)
    wait_until(lambda: not assoc.is_established, timeout=timeout + 5,
               what="the listener dropping the stalled association")
    elapsed = time.monotonic() - started
    assert elapsed <= timeout + 2.0, f"slot held {elapsed:.1f} s"
    time.sleep(0.5)
    f = make_study_files(tmp_path / "in", n=1)
    assert send_files_pynetdicom(node_proc.port, f, ExplicitVRLittleEndian, DX_STORAGE) == [0]
    assert node_proc.proc is not None and node_proc.proc.poll() is None


def test_a_vanished_spool_is_refused_and_nothing_is_written_underneath(
    node_proc: NodeProcess, settings: Settings, tmp_path: Path
) -> None:
    node_proc.start()
    files = make_study_files(tmp_path / "in", n=4)
    assert send_files_pynetdicom(node_proc.port, files[:1], ExplicitVRLittleEndian,
                                 DX_STORAGE) == [0]
    spool_dir = settings.spool_dir
    moved = spool_dir.with_name("spool-unmounted")
    spool_dir.rename(moved)
    # Renamed away (an unmounted volume with no mount point): refused.
    assert send_files_pynetdicom(node_proc.port, files[1:2], ExplicitVRLittleEndian,
                                 DX_STORAGE) == [0xA700]
    assert not spool_dir.exists()
    # An empty folder where the volume was (the mount point underneath): refused too.
    spool_dir.mkdir()
    assert send_files_pynetdicom(node_proc.port, files[2:3], ExplicitVRLittleEndian,
                                 DX_STORAGE) == [0xA700]
    assert list(spool_dir.iterdir()) == []
    spool_dir.rmdir()
    # The volume back: stores go on.
    moved.rename(spool_dir)
    assert send_files_pynetdicom(node_proc.port, files[3:], ExplicitVRLittleEndian,
                                 DX_STORAGE) == [0]
    db = Database(settings, migrate=False)
    try:
        assert len(instance_rows(db)) == 2
    finally:
        db.dispose()
    assert node_proc.proc is not None and node_proc.proc.poll() is None
