"""The whole way: Orthanc pushes a chest X-ray study to the real node (``python -m
dicom_node``), the stability loop queues it, a real Celery worker on real Redis analyses
it and delivers, and Orthanc ends up holding the SR and the SC in the same study."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pydicom
import pytest

from db.session import Database
from tests.support.dicom_factory import make_cxr, write
from tests.support.services import free_port, port_open, redis_reachable, wait_until
from tests.support.worker_data import register_and_promote
from tests.support.worker_process import REPO_ROOT, WorkerProcess, settings_env

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, pytest.mark.redis]


def test_orthanc_to_node_to_worker_to_orthanc(make_settings, sqlite_url: str,  # type: ignore[no-untyped-def]
                                              orthanc_factory, tmp_path: Path) -> None:
    if not redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    node_port = free_port()
    orthanc = orthanc_factory(modalities={"NODE": ["CXR_TRIAGE", "127.0.0.1", node_port]})
    tag = uuid.uuid4().hex[:10]
    settings = make_settings(
        database_url=sqlite_url, broker_url="redis://127.0.0.1:6379/0",
        inference_queue=f"inference-{tag}", delivery_queue=f"delivery-{tag}",
        port=node_port, bind_address="127.0.0.1", stable_seconds=1, scheduler_interval=0.3,
        pacs=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", input_size=224,
        institution_name="Test Hospital")
    db = Database(settings)
    # EfficientNet-Lite0 with its shipped ImageNet weights and a fresh head: offline.
    register_and_promote(db, settings, "e2e-lite0", architecture="efficientnet_lite0",
                         input_size=224)
    source = make_cxr(rows=256, cols=200, patient_name="Doe^Jane", patient_id="E2E-42")
    source.AccessionNumber = "ACC-E2E-1"
    orthanc.upload(write(source, tmp_path / "src.dcm"))

    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(settings_env(settings))
    node_log = open(tmp_path / "node.log", "ab")  # noqa: SIM115
    node = subprocess.Popen([sys.executable, "-m", "dicom_node"], cwd=REPO_ROOT, env=env,
                            stdout=node_log, stderr=subprocess.STDOUT)
    worker = WorkerProcess(settings, [settings.inference_queue, settings.delivery_queue],
                           tmp_path / "logs")
    try:
        wait_until(lambda: port_open("127.0.0.1", node_port), 60, what="the node listening")
        worker.start()
        study_id = orthanc.get("/studies")[0]
        orthanc.post("/modalities/NODE/store", {"Resources": [study_id], "Synchronous": True})

        def instances() -> list[str]:
            return list(orthanc.get(f"/studies/{study_id}/instances"))

        def log_tail() -> str:
            return ((tmp_path / "node.log").read_text(errors="replace")[-2000:]
                    + worker.log()[-3000:])

        wait_until(lambda: len(instances()) == 3, 180,
                   what=f"SR and SC back in Orthanc\n{log_tail()}")
    finally:
        worker.stop()
        node.terminate()
        node.wait(timeout=30)
        node_log.close()
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
