"""The whole way: Orthanc pushes a chest X-ray study to the real node (``python -m
dicom_node``), the stability loop queues it, a real Celery worker on real Redis analyses
it and delivers, and Orthanc ends up holding the SR and the SC in the same study."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from db.session import Database
from tests.support.dicom_factory import make_cxr, write
from tests.support.services import redis_reachable, wait_until
from tests.support.whole_loop import loop_settings, running_loop
from tests.support.worker_data import register_and_promote

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, pytest.mark.redis]


def test_orthanc_to_node_to_worker_to_orthanc(make_settings, sqlite_url: str,  # type: ignore[no-untyped-def]
                                              orthanc_factory, tmp_path: Path) -> None:
    if not redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    orthanc = orthanc_factory()
    settings = loop_settings(make_settings, sqlite_url, orthanc,
                             institution_name="Test Hospital")
    db = Database(settings)
    # EfficientNet-Lite0 with its shipped ImageNet weights and a fresh head: offline.
    register_and_promote(db, settings, "e2e-lite0", architecture="efficientnet_lite0",
                         input_size=224)
    source = make_cxr(rows=256, cols=200, patient_name="Doe^Jane", patient_id="E2E-42")
    source.AccessionNumber = "ACC-E2E-1"
    orthanc.upload(write(source, tmp_path / "src.dcm"))

    study_id = orthanc.get("/studies")[0]

    def instances() -> list[str]:
        return list(orthanc.get(f"/studies/{study_id}/instances"))

    with running_loop(settings, orthanc, tmp_path) as loop:
        orthanc.post("/modalities/NODE/store", {"Resources": [study_id], "Synchronous": True})
        wait_until(lambda: len(instances()) == 3, 180,
                   what=f"SR and SC back in Orthanc\n{loop.log_tail()}")
    objs = {}
    for inst in instances():
        ds = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{inst['ID']}/file")))
        objs[ds.Modality if ds.SOPInstanceUID != source.SOPInstanceUID else "SOURCE"] = ds
    assert len(objs) == 3 and {"SOURCE", "SR"} <= set(objs), sorted(objs)
    sr = objs["SR"]
    sc = next(ds for key, ds in objs.items() if key not in ("SOURCE", "SR"))
    for out in (sr, sc):
        assert out.StudyInstanceUID == source.StudyInstanceUID
        assert out.PatientID == source.PatientID and out.PatientName == source.PatientName
        assert out.AccessionNumber == source.AccessionNumber
        assert out.SeriesInstanceUID != source.SeriesInstanceUID
    assert len({sr.SOPInstanceUID, sc.SOPInstanceUID, source.SOPInstanceUID}) == 3
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    evidence = [i.ReferencedSOPInstanceUID
                for st in sr.CurrentRequestedProcedureEvidenceSequence
                for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert evidence == [source.SOPInstanceUID]
    assert [i.ReferencedSOPInstanceUID for i in sc.SourceImageSequence] == \
        [source.SOPInstanceUID]
    db.dispose()


def _echo_ok(orthanc) -> bool:  # type: ignore[no-untyped-def]
    try:
        orthanc.post("/modalities/NODE/echo", {})
        return True
    except OSError:
        return False
