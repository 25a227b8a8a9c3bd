"""Our SR and SC stored by a real Orthanc through our own sender, checked over its REST API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from db.settings import Destination
from dicom_node.results import write_dataset
from dicom_node.sc import SC_SERIES_DESCRIPTION, build_heatmap_sc
from dicom_node.sender import send_file
from dicom_node.sr import SR_SERIES_DESCRIPTION, build_sr, read_result
from tests.support.dicom_factory import make_cxr, write
from tests.support.results_factory import chest_sources, make_model, make_result, scored

pytestmark = pytest.mark.orthanc

CALLING_AE = "CXR_TRIAGE"


def _lookup(orthanc: Any, uid: str, kind: str) -> str:
    hits = [h for h in orthanc.post("/tools/lookup", raw=uid.encode()) if h["Type"] == kind]
    assert len(hits) == 1, f"{kind} {uid} not found in Orthanc: {hits}"
    return str(hits[0]["ID"])


def _destination(orthanc: Any) -> Destination:
    return Destination(orthanc.aet, "127.0.0.1", orthanc.dicom_port)


def _send_and_find(orthanc: Any, path: Path) -> dict[str, Any]:
    outcome = send_file(path, _destination(orthanc), CALLING_AE, timeout=20)
    assert outcome.ok and outcome.status == 0x0000, outcome.reason
    instance = _lookup(orthanc, path.stem, "Instance")
    tags: dict[str, Any] = orthanc.get(f"/instances/{instance}/simplified-tags")
    tags["_id"] = instance
    return tags


def test_sr_and_sc_of_a_real_file_are_stored_beside_their_source(
    orthanc_factory, shared_dicom: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    orthanc = orthanc_factory()
    source_path = chest_sources(shared_dicom)[0]
    source = pydicom.dcmread(source_path)
    orthanc.upload(source_path)
    model = make_model()

    sr_path = write_dataset(build_sr(make_result([source], [0.77], model=model)), tmp_path)
    sc_path = write_dataset(build_heatmap_sc(scored(source, 0.77), model), tmp_path)
    sr_tags = _send_and_find(orthanc, sr_path)
    sc_tags = _send_and_find(orthanc, sc_path)

    study = _lookup(orthanc, source.StudyInstanceUID, "Study")
    series = orthanc.get(f"/studies/{study}/series")
    descriptions = sorted(s["MainDicomTags"].get("SeriesDescription", "") for s in series)
    assert len(series) == 3  # the source's series, our SR series, our SC series
    assert SR_SERIES_DESCRIPTION in descriptions and SC_SERIES_DESCRIPTION in descriptions
    for tags in (sr_tags, sc_tags):
        assert tags["StudyInstanceUID"] == source.StudyInstanceUID
        assert tags["SeriesInstanceUID"] != source.SeriesInstanceUID
        assert tags["PatientID"] == source.PatientID
        assert tags["PatientName"] == str(source.PatientName)
        assert "PatientAge" not in tags
    assert sc_tags["BurnedInAnnotation"] == "YES"

    # What Orthanc stored reads back as the same result.
    stored = orthanc.get(f"/instances/{sr_tags['_id']}/file")
    stored_path = tmp_path / "stored_sr.dcm"
    stored_path.write_bytes(stored)
    readback = read_result(pydicom.dcmread(stored_path))
    assert readback.finding_present is True
    assert readback.probability == pytest.approx(0.77)


def test_non_ascii_name_survives_and_a_repeated_send_is_one_instance(
    orthanc_factory, tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    orthanc = orthanc_factory()
    name = "Müller^Jürgen"
    source = make_cxr(rows=256, cols=256, patient_name=name, charset="ISO_IR 192",
                      study_uid=generate_uid())
    orthanc.upload(write(source, tmp_path / "source.dcm"))
    model = make_model()

    sr_path = write_dataset(build_sr(make_result([source], [0.1], model=model)), tmp_path)
    first = _send_and_find(orthanc, sr_path)
    assert first["PatientName"] == name

    # Rebuilt from the same inputs: the same UID, so the PACS keeps one instance.
    rebuilt = write_dataset(build_sr(make_result([source], [0.1], model=model)),
                            tmp_path / "again")
    assert rebuilt.name == sr_path.name
    again = _send_and_find(orthanc, rebuilt)
    assert again["_id"] == first["_id"]
    series = _lookup(orthanc, first["SeriesInstanceUID"], "Series")
    assert len(orthanc.get(f"/series/{series}/instances")) == 1

    stored_path = tmp_path / "stored.dcm"
    stored_path.write_bytes(orthanc.get(f"/instances/{first['_id']}/file"))
    stored = pydicom.dcmread(stored_path)
    assert stored.SpecificCharacterSet == "ISO_IR 192"
    assert str(stored.PatientName) == name

    sc_path = write_dataset(build_heatmap_sc(scored(source, 0.1), model), tmp_path)
    sc_tags = _send_and_find(orthanc, sc_path)
    assert sc_tags["PatientName"] == name
    assert sc_tags["StudyInstanceUID"] == source.StudyInstanceUID
    study = _lookup(orthanc, source.StudyInstanceUID, "Study")
    assert len(orthanc.get(f"/studies/{study}/instances")) == 3
