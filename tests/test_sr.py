"""The Structured Report: valid (dciodvfy), readable (highdicom) and faithful to its sources."""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node import identity
from dicom_node.conformance import sanitise_source
from dicom_node.errors import BadInputError
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
    assert readback.image_probabilities == {}  # one image: the study group says it all


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
    from dicom_node.results import AnalysisResult, ModelInfo, ScoredImage
    from dicom_node.sc import build_heatmap_sc

    model = ModelInfo("cxr-triage COVID-19", "odd-length-1", "ab" * 32, "resnet18", 0.5,
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
