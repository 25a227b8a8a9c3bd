"""C-STORE data sets streamed to the spool while received (dicom_node.stream_store), against
a real pynetdicom peer that sends P-DATA exactly as we choose to split it."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from db.settings import Settings
from dicom_node.listener import NodeHandle, start_node
from dicom_node.pdata_read import split_values
from dicom_node.stream_store import INCOMING_DIR
from dicom_node.view_reader import ViewReader
from tests.support.dicom_factory import make_cxr, write
from tests.support.listener_peers import (
    count_instances,
    dataset_bytes,
    instance_rows,
    spool_files,
)

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.fixture
def node(settings: Settings) -> Iterator[NodeHandle]:
    handle = start_node(settings.replace(port=0, bind_address="127.0.0.1", min_free_mb=1),
                        run_stability=False)
    yield handle
    handle.stop()


def _association(port: int) -> object:
    """An association whose reactor is paused (as pynetdicom's own send_c_store does), so
    that the test reads the responses itself."""
    ae = AE(ae_title="STORESCU")
    ae.requested_contexts = [build_context(DX_STORAGE, [ExplicitVRLittleEndian])]
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
    assert assoc.is_established
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    return assoc


def _fragments(path: Path, context_id: int, message_id: int) -> list[P_DATA]:
    """The P-DATA primitives pynetdicom would send for ``path`` (one PDV each)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = io.BytesIO(dataset_bytes(path))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return list(message.encode_msg(context_id, 16384))


def _joined(*primitives: P_DATA) -> P_DATA:
    """One P-DATA (one P-DATA-TF PDU) carrying the PDVs of ``primitives``."""
    joined = P_DATA()
    for primitive in primitives:
        joined.presentation_data_value_list.extend(primitive.presentation_data_value_list)
    return joined


def _incoming(node: NodeHandle) -> list[Path]:
    directory = node.settings.spool_dir / INCOMING_DIR
    return sorted(directory.iterdir()) if directory.is_dir() else []


def test_pdvs_of_two_messages_in_one_pdu_are_split_between_them(
        node: NodeHandle, tmp_path: Path) -> None:
    files = [write(make_cxr(rows=256, cols=256, seed=i, instance_number=i + 1),
                   tmp_path / f"{i}.dcm") for i in range(2)]
    assoc = _association(node.port)
    context_id = assoc.accepted_contexts[0].context_id  # type: ignore[attr-defined]
    first, second = (_fragments(f, context_id, i + 1) for i, f in enumerate(files))
    assert len(first) > 4 and first[0].presentation_data_value_list[0][1][0] & 1
    # The command with the first data fragment; the last data fragment with the next
    # command: both split where the message ends.
    sends = [_joined(first[0], first[1]), *first[2:-1], _joined(first[-1], second[0]),
             *second[1:]]
    try:
        for primitive in sends:
            assoc.dul.send_pdu(primitive)  # type: ignore[attr-defined]
        statuses = [assoc.dimse.get_msg(block=True)[1].Status  # type: ignore[attr-defined]
                    for _ in files]
    finally:
        assoc._reactor_checkpoint.set()  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    assert statuses == [0, 0]
    rows = instance_rows(node.db)
    for f in files:
        stored = Path(rows[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID].path)
        assert dataset_bytes(stored) == dataset_bytes(f)
        assert rows[stored.stem].sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert rows[stored.stem].size_bytes == stored.stat().st_size
    assert (node.settings.spool_dir / INCOMING_DIR).is_dir()  # the streamed path was taken
    assert _incoming(node) == []


def test_an_association_aborted_mid_data_set_leaves_nothing(node: NodeHandle,
                                                            tmp_path: Path) -> None:
    path = write(make_cxr(rows=512, cols=512), tmp_path / "big.dcm")
    assoc = _association(node.port)
    context_id = assoc.accepted_contexts[0].context_id  # type: ignore[attr-defined]
    fragments = _fragments(path, context_id, 1)
    for primitive in fragments[:len(fragments) // 2]:
        assoc.dul.send_pdu(primitive)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while not _incoming(node) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_incoming(node)) == 1  # being written while it arrives
    assoc._reactor_checkpoint.set()  # type: ignore[attr-defined]
    assoc.abort()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while _incoming(node) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _incoming(node) == []
    assert count_instances(node.db) == 0
    assert spool_files(node.settings.spool_dir) == []


def test_view_reader_reads_seeks_and_tells_like_bytesio() -> None:
    data = bytes(range(200))
    view, plain = ViewReader(memoryview(data)), io.BytesIO(data)
    for op, arg in [("read", 10), ("seek", 50), ("read", 0), ("read", 7), ("seek", 500),
                    ("read", 4), ("seek", -3), ("read", -1)]:
        if op == "read":
            assert view.read(arg) == plain.read(arg)
        elif arg < 0:
            assert view.seek(arg, 2) == plain.seek(arg, 2)
        else:
            assert view.seek(arg) == plain.seek(arg)
        assert view.tell() == plain.tell()


def test_p_data_values_are_views_of_the_pdu_as_pynetdicom_splits_them() -> None:
    from pynetdicom.pdu import P_DATA_TF

    sent = P_DATA()
    sent.presentation_data_value_list.extend([(1, b"\x03" + b"c" * 10), (3, b"\x00" + b"d" * 300)])
    encoded = P_DATA_TF(sent).encode()
    ours, theirs = split_values(bytearray(encoded[6:])), P_DATA_TF()
    theirs.decode(encoded)
    assert [(i.presentation_context_id, bytes(i.presentation_data_value or b""))
            for i in ours.presentation_data_value_items] == \
        [(i.presentation_context_id, i.presentation_data_value)
         for i in theirs.presentation_data_value_items]
    assert all(isinstance(i.presentation_data_value, memoryview)
               for i in ours.presentation_data_value_items)
    for cut in (encoded[6:-1], encoded[6:9], encoded[6:] + b"\x00\x00\x00\x00\x01"):
        with pytest.raises(ValueError):
            split_values(bytearray(cut))


def test_a_message_complete_in_one_pdu_is_stored_from_memory(node: NodeHandle,
                                                              tmp_path: Path) -> None:
    path = write(make_cxr(rows=64, cols=64), tmp_path / "small.dcm")
    assoc = _association(node.port)
    context_id = assoc.accepted_contexts[0].context_id  # type: ignore[attr-defined]
    try:
        # Command and whole data set in one P-DATA: pynetdicom assembles it, nothing streams.
        assoc.dul.send_pdu(_joined(*_fragments(path, context_id, 1)))  # type: ignore[attr-defined]
        status = assoc.dimse.get_msg(block=True)[1].Status  # type: ignore[attr-defined]
    finally:
        assoc._reactor_checkpoint.set()  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    assert status == 0
    (row,) = instance_rows(node.db).values()
    assert dataset_bytes(Path(row.path)) == dataset_bytes(path)
    assert row.sha256 == hashlib.sha256(Path(row.path).read_bytes()).hexdigest()
    assert not (node.settings.spool_dir / INCOMING_DIR).exists()  # never streamed
