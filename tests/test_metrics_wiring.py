"""The listener and the worker really move the Prometheus metrics they promise."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY
from pynetdicom import AE

from db.session import Database
from db.settings import Settings
from dicom_node.listener import start_node
from tests.support.dicom_factory import make_cxr
from worker.delivery import create_deliveries, deliver
from worker.outputs import OutputFile


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_listener_counts_received_and_rejected(make_settings, sqlite_url: str) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings(database_url=sqlite_url, port=0)
    node = start_node(settings, run_stability=False)
    try:
        before_ok = _value("cxr_instances_received_total", modality="DX")
        before_assoc = _value("cxr_instances_rejected_total", reason="association")
        ae = AE(ae_title="STORESCU")
        ds = make_cxr()
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=settings.ae_title)
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000  # a duplicate is not counted again
        assoc.release()
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assert not stranger.associate("127.0.0.1", node.port,
                                      ae_title=settings.ae_title).is_established
    finally:
        node.stop()
    assert _value("cxr_instances_received_total", modality="DX") == before_ok + 1
    assert _value("cxr_instances_rejected_total", reason="association") == before_assoc + 1


def test_delivery_outcomes_are_counted(make_settings, sqlite_url: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                       refused_port: int) -> None:
    from tests.support.dicom_factory import write
    from tests.support.worker_data import add_study

    settings: Settings = make_settings(database_url=sqlite_url,
                                       pacs=f"PACS@127.0.0.1:{refused_port}")
    db = Database(settings)
    ds = make_cxr()
    path = write(ds, tmp_path / "sc.dcm")
    study_id = add_study(db, settings, [path])
    from db.models import utcnow

    with db.session() as s:
        rows = create_deliveries(s, settings, study_id, None,
                                 [OutputFile("sc", str(ds.SOPInstanceUID), path)], utcnow())
        row_id = rows[0].id
    before = _value("cxr_delivery_attempts_total", kind="sc", outcome="retry")
    assert deliver(db, settings, row_id).status == "retry"  # nobody listens on that port
    assert _value("cxr_delivery_attempts_total", kind="sc", outcome="retry") == before + 1
    db.dispose()
