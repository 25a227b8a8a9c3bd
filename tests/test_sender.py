"""The C-STORE sender against real pynetdicom SCPs: success, warning, failure, refusal."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from db.settings import Destination
from dicom_node.errors import BadInputError
from dicom_node.results import write_dataset
from dicom_node.sender import outcome_for_status, send_file
from dicom_node.sr import build_sr
from tests.support.dicom_factory import make_cxr
from tests.support.results_factory import make_result
from tests.support.services import free_port

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def sr_file(tmp_path: Path) -> Path:
    return write_dataset(build_sr(make_result([make_cxr(rows=32, cols=32)])), tmp_path)


class _Scp:
    """A real Storage SCP on a free port answering every C-STORE with one status."""

    def __init__(self, status: int, transfer_syntaxes: list[str],
                 require_calling_aet: list[str] | None = None) -> None:
        self.status = status
        self.received: list[str] = []
        self.nodelay: list[int] = []
        self.port = free_port()
        ae = AE(ae_title="TEST_SCP")
        ae.add_supported_context(COMPREHENSIVE_3D_SR, transfer_syntaxes)
        if require_calling_aet:
            ae.require_calling_aet = require_calling_aet
        self.server: ThreadedAssociationServer = ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event: Event) -> int:
        self.received.append(str(event.dataset.SOPInstanceUID))
        return self.status

    @property
    def destination(self) -> Destination:
        return Destination("TEST_SCP", "127.0.0.1", self.port)


@pytest.fixture
def scp_factory() -> Iterator[object]:
    servers: list[_Scp] = []

    def start(status: int, transfer_syntaxes: list[str] | None = None,
              require_calling_aet: list[str] | None = None) -> _Scp:
        scp = _Scp(status, transfer_syntaxes or [ExplicitVRLittleEndian], require_calling_aet)
        servers.append(scp)
        return scp

    yield start
    for scp in servers:
        scp.server.shutdown()


def test_success_status_is_stored(sr_file: Path, scp_factory) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(0x0000)
    outcome = send_file(sr_file, scp.destination, "CXR_TRIAGE", timeout=10)
    assert outcome.ok and not outcome.warning and outcome.status == 0x0000
    assert scp.received == [sr_file.stem]


@pytest.mark.parametrize("status", [0xB000, 0xB006, 0xB007])
def test_warning_status_counts_as_stored(sr_file: Path, scp_factory, status: int) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(status)
    outcome = send_file(sr_file, scp.destination, "CXR_TRIAGE", timeout=10)
    assert outcome.ok and outcome.warning and outcome.status == status
    assert scp.received == [sr_file.stem]


@pytest.mark.parametrize("status", [0xA700, 0xA900, 0xC000])
def test_failure_status_is_not_stored(sr_file: Path, scp_factory, status: int) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(status)
    outcome = send_file(sr_file, scp.destination, "CXR_TRIAGE", timeout=10)
    assert not outcome.ok and outcome.status == status
    assert f"0x{status:04X}" in outcome.reason


def test_explicit_file_reaches_an_implicit_only_peer(sr_file: Path, scp_factory) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(0x0000, [ImplicitVRLittleEndian])
    outcome = send_file(sr_file, scp.destination, "CXR_TRIAGE", timeout=10)
    assert outcome.ok, outcome.reason
    assert scp.received == [sr_file.stem]


def test_closed_port_is_refused_without_raising(sr_file: Path) -> None:
    outcome = send_file(sr_file, Destination("NOBODY", "127.0.0.1", free_port()),
                        "CXR_TRIAGE", timeout=5)
    assert not outcome.ok and outcome.status is None
    assert "refused" in outcome.reason or "unreachable" in outcome.reason


def test_rejected_association_is_reported(sr_file: Path, scp_factory) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(0x0000, require_calling_aet=["SOMEONE_ELSE"])
    outcome = send_file(sr_file, scp.destination, "CXR_TRIAGE", timeout=10)
    assert not outcome.ok and outcome.reason == "association rejected"
    assert scp.received == []


def test_unsupported_sop_class_is_reported(tmp_path: Path, scp_factory) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(0x0000)
    image = write_dataset(make_cxr(rows=8, cols=8), tmp_path)
    outcome = send_file(image, scp.destination, "CXR_TRIAGE", timeout=10)
    assert not outcome.ok and "presentation context" in outcome.reason


def test_unreadable_file_is_bad_input(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    with pytest.raises(BadInputError):
        send_file(junk, Destination("X", "127.0.0.1", free_port()), "CXR_TRIAGE")


def test_status_classification() -> None:
    assert outcome_for_status(0x0000).ok
    assert outcome_for_status(0x0107).warning
    assert not outcome_for_status(0xA701).ok
    assert not outcome_for_status(0xCFFF).ok


def test_nodelay_is_set_on_the_association_socket(sr_file: Path, scp_factory,  # type: ignore[no-untyped-def]
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Watch the real socket option as the sender sets it."""
    seen: list[int] = []
    original = socket.socket.setsockopt

    def spy(self: socket.socket, level: int, option: int, value: object) -> None:
        if level == socket.IPPROTO_TCP and option == socket.TCP_NODELAY:
            seen.append(int(value))  # type: ignore[call-overload]
        original(self, level, option, value)  # type: ignore[call-overload]

    monkeypatch.setattr(socket.socket, "setsockopt", spy)
    scp = scp_factory(0x0000)
    assert send_file(sr_file, scp.destination, "CXR_TRIAGE", timeout=10).ok
    assert seen == [1]
