"""The C-STORE sender against real pynetdicom SCPs: success, warning, failure, refusal."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from db.errors import BadInputError
from db.settings import Destination
from dicom_node.results import write_dataset
from dicom_node.sender import outcome_for_status, send_file
from dicom_node.sr import build_sr
from tests.support.dicom_factory import make_cxr
from tests.support.results_factory import make_result

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def sr_file(tmp_path: Path) -> Path:
    return write_dataset(build_sr(make_result([make_cxr(rows=32, cols=32)])), tmp_path)


class _Scp:
    """A real Storage SCP on a free port answering every C-STORE with one status."""

    def __init__(self, status: int, transfer_syntaxes: list[str],
                 require_calling_aet: list[str] | None = None,
                 classes: list[str] | None = None) -> None:
        self.status = status
        self.received: list[str] = []
        self.stored: list[tuple[str, str, str]] = []  # (class, syntax, association id)
        self.datasets: list[Dataset] = []
        self.nodelay: list[int] = []
        ae = AE(ae_title="TEST_SCP")
        for sop_class in classes or [COMPREHENSIVE_3D_SR]:
            for ts in transfer_syntaxes:
                # One context per syntax, so the SCP may accept several of one class.
                ae.add_supported_context(sop_class, [ts])
        if require_calling_aet:
            ae.require_calling_aet = require_calling_aet
        self.server: ThreadedAssociationServer = ae.start_server(
            ("127.0.0.1", 0), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(str(ds.SOPInstanceUID))
        self.datasets.append(ds)
        self.stored.append((str(event.context.abstract_syntax),
                            str(event.context.transfer_syntax), str(id(event.assoc))))
        return self.status

    @property
    def destination(self) -> Destination:
        return Destination("TEST_SCP", "127.0.0.1", self.port)


@pytest.fixture
def scp_factory() -> Iterator[object]:
    servers: list[_Scp] = []

    def start(status: int, transfer_syntaxes: list[str] | None = None,
              require_calling_aet: list[str] | None = None,
              classes: list[str] | None = None) -> _Scp:
        scp = _Scp(status, transfer_syntaxes or [ExplicitVRLittleEndian], require_calling_aet,
                   classes)
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


def test_closed_port_is_refused_without_raising(sr_file: Path, refused_port: int) -> None:
    outcome = send_file(sr_file, Destination("NOBODY", "127.0.0.1", refused_port),
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
    assert not outcome.ok and outcome.permanent
    assert outcome.reason == "PACS does not accept Digital X-Ray Image Storage - For " \
        "Presentation"
    assert scp.received == []


def test_unreadable_file_is_bad_input(tmp_path: Path, refused_port: int) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    with pytest.raises(BadInputError):
        send_file(junk, Destination("X", "127.0.0.1", refused_port), "CXR_TRIAGE")


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


# ----------------------------------------------------------- negotiation with fallback
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def sc_file(tmp_path: Path) -> Path:
    from dicom_node.sc import build_heatmap_sc
    from tests.support.results_factory import make_model, scored

    return write_dataset(build_heatmap_sc(scored(make_cxr(rows=96, cols=80), 0.6),
                                          make_model()), tmp_path)


@pytest.mark.parametrize("accepted", [COMPREHENSIVE_SR, ENHANCED_SR])
def test_sr_is_sent_in_the_class_the_pacs_accepts(sr_file: Path, scp_factory,  # type: ignore[no-untyped-def]
                                                  accepted: str) -> None:
    from dicom_node import identity
    from dicom_node.sr import read_result

    scp = scp_factory(0x0000, classes=[accepted])
    outcome = send_file(sr_file, scp.destination, "CXR_TRIAGE", timeout=10)
    assert outcome.ok, outcome.reason
    assert outcome.sent_sop_class == accepted
    [received] = scp.datasets
    assert received.SOPClassUID == accepted
    # Another class is another object: a UID of its own, ours, stable across sends.
    assert outcome.sent_uid == received.SOPInstanceUID != sr_file.stem
    assert identity.is_own_uid(outcome.sent_uid)
    assert read_result(received).probability == pytest.approx(0.8)
    again = send_file(sr_file, scp.destination, "CXR_TRIAGE", timeout=10)
    assert again.sent_uid == outcome.sent_uid
    assert len(list(sr_file.parent.glob(f"{sr_file.stem}.*.dcm"))) == 1


def test_pacs_without_any_sr_class_fails_at_once_and_for_good(sr_file: Path,  # type: ignore[no-untyped-def]
                                                             scp_factory) -> None:
    scp = scp_factory(0x0000, classes=[CT_IMAGE])
    outcome = send_file(sr_file, scp.destination, "CXR_TRIAGE", timeout=10)
    assert not outcome.ok and outcome.permanent
    assert outcome.reason == "PACS does not accept Comprehensive 3D SR Storage"


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
                                    "1.2.840.10008.1.2.5", ImplicitVRLittleEndian])
def test_sc_goes_compressed_where_accepted_with_the_same_pixels(  # type: ignore[no-untyped-def]
        sc_file: Path, scp_factory, syntax: str) -> None:
    import numpy as np
    import pydicom

    scp = scp_factory(0x0000, [syntax], classes=[SECONDARY_CAPTURE])
    outcome = send_file(sc_file, scp.destination, "CXR_TRIAGE", timeout=10)
    assert outcome.ok, outcome.reason
    assert outcome.transfer_syntax == syntax and outcome.sent_uid == sc_file.stem
    [received] = scp.datasets
    assert received.file_meta.TransferSyntaxUID == syntax
    original = pydicom.dcmread(sc_file)
    assert np.array_equal(received.pixel_array, original.pixel_array)


def test_sc_prefers_lossless_compression_over_uncompressed(sc_file: Path,  # type: ignore[no-untyped-def]
                                                           scp_factory) -> None:
    scp = scp_factory(0x0000, [ExplicitVRLittleEndian, "1.2.840.10008.1.2.5"],
                      classes=[SECONDARY_CAPTURE])
    outcome = send_file(sc_file, scp.destination, "CXR_TRIAGE", timeout=10)
    assert outcome.ok and outcome.transfer_syntax == "1.2.840.10008.1.2.5"


def test_sr_and_sc_of_a_study_share_one_association(sr_file: Path, sc_file: Path,  # type: ignore[no-untyped-def]
                                                    scp_factory) -> None:
    from dicom_node.sender import send_files

    scp = scp_factory(0x0000, classes=[COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE])
    outcomes = send_files([sr_file, sc_file], scp.destination, "CXR_TRIAGE", timeout=10)
    assert [o.ok for o in outcomes] == [True, True]
    assert len({assoc for _c, _t, assoc in scp.stored}) == 1
    assert [c for c, _t, _a in scp.stored] == [COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE]


def test_one_refused_class_does_not_stop_the_others(sr_file: Path, sc_file: Path,  # type: ignore[no-untyped-def]
                                                    scp_factory) -> None:
    from dicom_node.sender import send_files

    scp = scp_factory(0x0000, classes=[SECONDARY_CAPTURE])
    sr_out, sc_out = send_files([sr_file, sc_file], scp.destination, "CXR_TRIAGE",
                                timeout=10)
    assert sr_out.permanent and not sr_out.ok
    assert sc_out.ok and scp.received == [sc_file.stem]
