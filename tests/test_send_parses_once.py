"""Delivery parses each outbox file once before streaming it to a real pynetdicom SCP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event

from db.settings import Destination
from dicom_node import sender
from dicom_node.results import write_dataset
from dicom_node.sc import build_heatmap_sc
from dicom_node.sr import build_sr
from tests.support.dicom_factory import make_cxr
from tests.support.results_factory import make_model, make_result, scored
from worker.delivery import send_many

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture
def scp() -> Iterator[tuple[Destination, list[Dataset]]]:
    """A real Storage SCP on a port the kernel picks, keeping what it receives."""
    received: list[Dataset] = []

    def on_store(event: Event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="TEST_SCP")
    for cls in (COMPREHENSIVE_SR, SECONDARY_CAPTURE):  # the SR must become a variant
        ae.add_supported_context(cls, [ExplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        yield Destination("TEST_SCP", "127.0.0.1", server.server_address[1]), received
    finally:
        server.shutdown()


def test_each_outbox_file_is_parsed_once_then_streamed(
        tmp_path: Path, scp: tuple[Destination, list[Dataset]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    destination, received = scp
    sr_file = write_dataset(build_sr(make_result([make_cxr(rows=32, cols=32)])), tmp_path)
    sc_file = write_dataset(build_heatmap_sc(scored(make_cxr(rows=96, cols=80), 0.6),
                                             make_model()), tmp_path)
    assert pydicom.dcmread(sr_file).SOPClassUID == COMPREHENSIVE_3D_SR
    reads: list[str] = []
    real = pydicom.dcmread

    def counting(path: Path, *args: object, **kwargs: object) -> Dataset:
        reads.append(Path(path).name)
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sender, "dcmread", counting)
    results = send_many([sr_file, sc_file], destination, "CXR_TRIAGE")
    assert [r.ok for r in results] == [True, True], [r.reason for r in results]
    # One header read per file; the SR's class variant needs its full dataset once to
    # be written (a second send finds the variant on disk and reads only its header).
    assert sorted(reads) == sorted([sr_file.name, sr_file.name, sc_file.name])
    assert [str(ds.SOPClassUID) for ds in received] == [COMPREHENSIVE_SR, SECONDARY_CAPTURE]
    assert results[0].sent_uid == str(received[0].SOPInstanceUID) != sr_file.stem
    assert results[1].sent_uid == sc_file.stem

    reads.clear()
    again = send_many([sr_file, sc_file], destination, "CXR_TRIAGE")
    assert again[0].sent_uid == results[0].sent_uid
    [variant] = sr_file.parent.glob(f"{sr_file.stem}.*.dcm")
    assert sorted(reads) == sorted([sr_file.name, sc_file.name, variant.name])
