"""The Structured Report: valid (dciodvfy), readable (highdicom) and faithful to its sources."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid

from db.errors import BadInputError
from dicom_node import identity
from dicom_node.conformance import sanitise_source
from dicom_node.results import PredecessorRef, write_dataset
from dicom_node.sr import (
    NOT_ANALYSED_SERIES_DESCRIPTION,
    SR_SERIES_DESCRIPTION,
    build_not_analysed_sr,
    build_sr,
    read_result,
)
from tests.support.dicom_factory import make_cxr
from tests.support.results_factory import (
    chest_sources,
    dciodvfy,
    make_model,
    make_result,
    unexpected_warnings,
)

NAME = "Müller^Jürgen"


def _study(n: int = 3, **kwargs: object) -> list[pydicom.Dataset]:
    study = generate_uid()
    series = generate_uid()
    return [
        make_cxr(study_uid=study, series_uid=series, rows=256, cols=256, seed=i,
                 instance_number=i + 1, **kwargs)  # type: ignore[arg-type]
        for i in range(n)
    ]


def _write_and_check(ds: pydicom.Dataset, directory: Path) -> pydicom.Dataset:
    path = write_dataset(ds, directory)
    assert path.name == f"{ds.SOPInstanceUID}.dcm"
    assert not list(directory.glob(".tmp-*")), "temporary file left behind"
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    assert unexpected_warnings(warnings) == [], warnings
    return pydicom.dcmread(path)


def test_sr_of_a_three_image_study_validates_and_reads_back(tmp_path: Path) -> None:
    sources = _study(3, patient_name=NAME, charset="ISO_IR 192")
    model = make_model(threshold=0.5)
    result = make_result(sources, [0.1, 0.7, 0.3], model=model)
    back = _write_and_check(build_sr(result, institution_name="Test Hospital"), tmp_path)

    # Same study, own series, our labels, patient copied with its character set.
    assert back.StudyInstanceUID == sources[0].StudyInstanceUID
    assert back.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert back.Modality == "SR"
    assert back.SeriesDescription == SR_SERIES_DESCRIPTION
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == NAME
    assert back.PatientID == sources[0].PatientID
    assert back.StudyDate == sources[0].StudyDate
    assert back.InstitutionName == "Test Hospital"
    assert back.SeriesNumber == identity.series_number(identity.SR, model.version)

    # The evidence and the image library reference every scored image.
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    referenced = {i.ReferencedSOPInstanceUID for i in evidence.ReferencedSOPSequence}
    assert referenced == {s.SOPInstanceUID for s in sources}
    sr = hd.sr.Comprehensive3DSR.from_dataset(back)
    library = [c for c in sr.ContentSequence
               if c.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"]
    assert len(library) == 1
    library_text = str(library[0])
    assert all(s.SOPInstanceUID in library_text for s in sources)

    # Finding, probability, threshold and per-image probabilities read back.
    readback = read_result(back)
    assert readback.finding_present is True
    assert readback.probability == pytest.approx(0.7)
    assert readback.threshold == pytest.approx(0.5)
    assert readback.image_probabilities == {
        s.SOPInstanceUID: pytest.approx(p) for s, p in zip(sources, [0.1, 0.7, 0.3], strict=True)
    }
    assert readback.algorithm_name == model.name
    assert readback.algorithm_version == model.version

    # The device observer names the model; contributing equipment carries its hash.
    observers = sr.content.get_observer_contexts()
    device = observers[0].observer_identifying_attributes
    assert device.uid == identity.device_uid(model.version, model.sha256)
    assert device.name == model.name
    equipment = [e for e in back.ContributingEquipmentSequence
                 if e.get("ManufacturerModelName") == model.name]
    assert len(equipment) == 1
    assert equipment[0].SoftwareVersions == model.version
    assert equipment[0].DeviceSerialNumber == model.sha256
    assert model.sha256 in equipment[0].ContributionDescription
    assert model.sha256 in equipment[0].ContributionDescription


def test_negative_call_below_threshold(tmp_path: Path) -> None:
    sources = _study(1)
    result = make_result(sources, [0.2], model=make_model(threshold=0.42))
    readback = read_result(_write_and_check(build_sr(result), tmp_path))
    assert readback.finding_present is False
    assert readback.probability == pytest.approx(0.2)
    assert readback.threshold == pytest.approx(0.42)
    # One image still has its own group: its probability and its hotspot.
    assert readback.image_probabilities == {sources[0].SOPInstanceUID: pytest.approx(0.2)}
    assert set(readback.hotspots) == {sources[0].SOPInstanceUID}


def test_reanalysis_references_the_previous_sr(tmp_path: Path) -> None:
    sources = _study(1)
    first = build_sr(make_result(sources, [0.3]))
    previous = PredecessorRef(first.StudyInstanceUID, first.SeriesInstanceUID,
                              first.SOPClassUID, first.SOPInstanceUID)
    sources.append(make_cxr(study_uid=sources[0].StudyInstanceUID, rows=256, cols=256,
                            seed=7))
    second = build_sr(make_result(sources, [0.3, 0.9], predecessor=previous))
    back = _write_and_check(second, tmp_path)
    assert back.SOPInstanceUID != first.SOPInstanceUID
    pred = back.PredecessorDocumentsSequence[0]
    assert pred.StudyInstanceUID == first.StudyInstanceUID
    series = pred.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_not_analysed_sr_states_its_reason(tmp_path: Path) -> None:
    sources = _study(2, view_position=None)
    sr = build_not_analysed_sr(sources, "no frontal chest radiograph in study", make_model())
    back = _write_and_check(sr, tmp_path)
    assert back.SeriesDescription == NOT_ANALYSED_SERIES_DESCRIPTION
    assert back.StudyInstanceUID == sources[0].StudyInstanceUID
    readback = read_result(back)
    assert readback.not_analysed_reason == "no frontal chest radiograph in study"
    assert readback.finding_present is None and readback.probability is None
    normal = build_sr(make_result(sources))
    assert normal.SOPInstanceUID != sr.SOPInstanceUID


def test_sr_from_each_real_shared_file_validates(shared_dicom: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    for path in chest_sources(shared_dicom):
        source = pydicom.dcmread(path)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dicom_node.conformance"):
            sr = build_sr(make_result([source], [0.66]))
        back = _write_and_check(sr, tmp_path / path.stem)
        # Non-conformant Patient's Age is left out and logged by keyword, not value.
        assert "PatientAge" not in back
        assert any("PatientAge" in r.getMessage() for r in caplog.records)
        assert not any(str(source.PatientAge) in r.getMessage().split()
                       for r in caplog.records)
        # Missing Type 2 attributes are present and empty, never invented.
        for keyword in ("StudyDate", "AccessionNumber", "StudyID", "PatientBirthDate"):
            assert keyword in back
            assert (back[keyword].value or "") == (source.get(keyword) or "")
        assert back.StudyInstanceUID == source.StudyInstanceUID
        assert read_result(back).probability == pytest.approx(0.66)
        assert "PatientAge" in source  # the source itself is untouched


def test_sanitise_refuses_a_source_without_identity() -> None:
    ds = make_cxr(rows=8, cols=8)
    del ds.StudyInstanceUID
    with pytest.raises(BadInputError, match="StudyInstanceUID"):
        sanitise_source(ds)


def test_sanitise_empties_invalid_type2_and_drops_invalid_optional() -> None:
    ds = make_cxr(rows=8, cols=8)
    ds.PatientSex = "MALE"  # not an enumerated value
    ds.StudyDate = "2024-01-01"  # not a DA
    ds.PatientAge = "81"
    clean = sanitise_source(ds)
    assert clean.PatientSex in (None, "")
    assert clean.StudyDate in (None, "")
    assert "PatientAge" not in clean
    assert "PixelData" not in clean
    assert clean.PatientName == ds.PatientName


def test_builders_emit_no_warning_that_names_the_patient() -> None:
    """highdicom warns about single-component names, quoting them: we keep that quiet."""
    import warnings

    from dicom_node.sc import build_heatmap_sc
    from tests.support.results_factory import scored

    source = make_cxr(rows=32, cols=32, patient_name="SINGLECOMPONENTNAME")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_sr(make_result([source]))
        build_heatmap_sc(scored(source, 0.5), make_model())
    assert not [w for w in caught if "SINGLECOMPONENTNAME" in str(w.message)]


def test_outputs_read_back_without_validation_warnings(tmp_path: Path) -> None:
    """Every value we write reads back within its VR's limits (no pydicom warnings)."""
    import warnings

    import numpy as np

    from dicom_node.pixels import decode_pixels
    from dicom_node.results import AnalysisResult, OutputModel, ScoredImage
    from dicom_node.sc import build_heatmap_sc

    model = OutputModel("cxr-triage COVID-19", "odd-length-1", "ab" * 32, "resnet18", 0.5,
                      "gradcam")
    ds = make_cxr()
    image = decode_pixels(ds)
    scored = ScoredImage(source=ds, probability=0.7, heatmap=np.zeros_like(image),
                         image01=image)
    result = AnalysisResult(study_probability=0.7, positive=True, scored=[scored], model=model,
                            predecessor=None, not_analysed_reason=None)
    for obj in (build_sr(result), build_heatmap_sc(scored, model)):
        path = write_dataset(obj, tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in pydicom.dcmread(path).iterall():
                pass


# ------------------------------------------------------------------ IHE AI Results detail
def _dsrdump(path: Path) -> str:
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (DCMTK) is not installed")
    proc = subprocess.run(["dsrdump", "+Pc", "+Pl", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _dcentvfy(path: Path) -> list[str]:
    if shutil.which("dcentvfy") is None:
        pytest.skip("dcentvfy (dicom3tools) is not installed")
    proc = subprocess.run(["dcentvfy", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def _cr(seed: int, study: str, **kwargs: object) -> pydicom.Dataset:
    return make_cxr(study_uid=study, rows=200, cols=160, seed=seed, modality="CR",
                    **kwargs)  # type: ignore[arg-type]


def test_air_detail_reads_right_in_dsrdump(tmp_path: Path) -> None:
    from tests.support.results_factory import blob_heatmap, pixels01

    study = generate_uid()
    sources = [_cr(1, study), _cr(2, study, view_position="LL")]
    model = make_model(threshold=0.5)
    result = make_result(sources, [0.2, 0.4], model=model)  # negative
    built = build_sr(result)
    back = _write_and_check(built, tmp_path)
    dump = _dsrdump(tmp_path / f"{back.SOPInstanceUID}.dcm")
    # Modality of the library from the sources (CR), not "Other".
    assert '(CR,DCM,"Computed Radiography")' in dump and '"Other"' not in dump
    # Two views scored: the two-view procedure.
    assert '(36687-2,LN,"XR Chest 2 Views")' in dump
    # The evaluation comes before the numbers, and it says Absent.
    study_group = dump[dump.index("COVID-19 study classification"):]
    assert study_group.index('=(272519000,SCT,"Absent")') < study_group.index('"Probability"')
    # Finding site lung; the hotspot as a POINT on its source image.
    assert '(39607008,SCT,"Lung")' in dump
    assert "SCOORD" in dump and "POINT" in dump
    # One tracking identifier per image group.
    trackings = [ln for ln in dump.splitlines() if '"Tracking Identifier"' in ln]
    assert len(trackings) == len(set(trackings)) == 3
    # Observation UIDs on every content item, all distinct.
    uids = [item.ObservationUID for _p, item in _walk_items(back)]
    assert uids and len(uids) == len(set(uids))
    # The equipment module names the model.
    assert back.ManufacturerModelName == model.name
    assert back.SoftwareVersions == model.version
    # The hotspot is the heatmap's maximum on the source image, read back.
    readback = read_result(back)
    expected_col, expected_row = 0.33 * 160, 0.5 * 200
    col, row = readback.hotspots[sources[0].SOPInstanceUID]
    assert abs(col - expected_col) <= 1.5 and abs(row - expected_row) <= 1.5
    assert blob_heatmap((200, 160)).shape == pixels01(sources[0]).shape


def _walk_items(ds: pydicom.Dataset):  # type: ignore[no-untyped-def]
    from dicom_node.sr_content import walk_content

    return walk_content(ds.ContentSequence, "1")


def test_procedure_reported_comes_from_the_source_when_it_names_one(tmp_path: Path) -> None:
    sources = _study(1)
    code = pydicom.Dataset()
    code.CodeValue = "RPID16"
    code.CodingSchemeDesignator = "RADLEX"
    code.CodeMeaning = "XR CHEST 1 VIEW"
    sources[0].ProcedureCodeSequence = [code]
    back = _write_and_check(build_sr(make_result(sources)), tmp_path)
    dump = _dsrdump(tmp_path / f"{back.SOPInstanceUID}.dcm")
    assert '(RPID16,RADLEX,"XR CHEST 1 VIEW")' in dump
    assert "36554-4" not in dump


def test_not_analysed_report_has_no_finding_header(tmp_path: Path) -> None:
    sources = _study(1, body_part="ABDOMEN")
    back = _write_and_check(
        build_not_analysed_sr(sources, "not a chest radiograph", make_model()), tmp_path)
    dump = _dsrdump(tmp_path / f"{back.SOPInstanceUID}.dcm")
    assert "COVID-19" not in dump and '"Finding"' not in dump
    assert "Not analysed: not a chest radiograph" in dump
    assert "36554-4" not in dump and '(363679005,SCT,"Imaging")' in dump


def test_findings_are_a_list_and_a_second_one_is_reported_beside_covid(
        tmp_path: Path) -> None:
    from dataclasses import replace

    from dicom_node.results import Finding, FindingConcept
    from dicom_node.sr import read_findings

    sources = _study(1)
    pneumonia = Finding(FindingConcept("233604007", "SCT", "Pneumonia"), 0.81, 0.6, True)
    result = replace(make_result(sources, [0.3], model=make_model(threshold=0.5)),
                     extra_findings=(pneumonia,))
    back = _write_and_check(build_sr(result), tmp_path)
    found = read_findings(back)
    assert [(f.code, f.present) for f in found] == [("840539006", False), ("233604007", True)]
    assert found[1].probability == pytest.approx(0.81)
    assert found[1].threshold == pytest.approx(0.6)
    assert read_result(back).finding_present is False


def test_dcentvfy_adds_no_error_to_the_sources(shared_dicom: Path, tmp_path: Path) -> None:
    for path in chest_sources(shared_dicom):
        source = pydicom.dcmread(path)
        before = _dcentvfy(path)
        sr_path = write_dataset(build_sr(make_result([source], [0.6])), tmp_path)
        # dcentvfy checks that the entities in a set of files agree: source plus SR.
        together = _dcentvfy_pair(path, sr_path)
        new = [e for e in together if e not in before]
        assert new == [], new


def _dcentvfy_pair(a: Path, b: Path) -> list[str]:
    proc = subprocess.run(["dcentvfy", str(a), str(b)], capture_output=True, text=True,
                          timeout=60, check=False)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]
