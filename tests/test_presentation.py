"""Optional viewer-native results: a GSPS with the hotspot and a KOS for positive
studies.  Off by default; when on, valid (dciodvfy, dcentvfy) and stored by Orthanc."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from db.settings import Destination
from dicom_node import identity
from dicom_node.presentation import build_hotspot_gsps, build_positive_kos
from dicom_node.results import write_dataset
from dicom_node.sender import send_files
from dicom_node.sr import hotspot
from tests.support.dicom_factory import make_cxr
from tests.support.results_factory import (
    chest_sources,
    dciodvfy,
    make_model,
    make_result,
    scored,
    unexpected_warnings,
)


def _valid(path: Path, source: Path | None = None) -> None:
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    assert unexpected_warnings(warnings) == [], warnings
    if source is not None:
        def entity_errors(*files: Path) -> list[str]:
            proc = subprocess.run(["dcentvfy", *map(str, files)], capture_output=True,
                                  text=True, timeout=60, check=False)
            return [ln for ln in (proc.stdout + proc.stderr).splitlines()
                    if ln.startswith("Error")]
        before = entity_errors(source)
        assert [e for e in entity_errors(source, path) if e not in before] == []


def test_gsps_draws_the_hotspot_on_the_source(tmp_path: Path) -> None:
    source = make_cxr(rows=200, cols=160)
    image = scored(source, 0.7)
    gsps = build_hotspot_gsps(image, make_model())
    assert gsps is not None
    path = write_dataset(gsps, tmp_path)
    _valid(path)
    back = pydicom.dcmread(path)
    assert identity.is_own_uid(back.SOPInstanceUID)
    ref = back.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    [annotation] = back.GraphicAnnotationSequence
    [circle] = annotation.GraphicObjectSequence
    assert circle.GraphicType == "CIRCLE"
    col, row = hotspot(image.heatmap)  # type: ignore[misc]
    assert list(circle.GraphicData[:2]) == pytest.approx([col, row])
    assert "hotspot" in annotation.TextObjectSequence[0].UnformattedTextValue
    # No heatmap, no presentation state.
    assert build_hotspot_gsps(scored(source, 0.7, with_heatmap=False), make_model()) is None


def test_kos_flags_the_images_of_a_positive_study(tmp_path: Path) -> None:
    sources = [make_cxr(rows=64, cols=64, seed=i) for i in range(2)]
    for s in sources[1:]:
        s.StudyInstanceUID = sources[0].StudyInstanceUID
    path = write_dataset(build_positive_kos(sources, make_model()), tmp_path)
    _valid(path)
    back = pydicom.dcmread(path)
    assert back.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    referenced = {i.ReferencedSOPInstanceUID
                  for st in back.CurrentRequestedProcedureEvidenceSequence
                  for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert referenced == {s.SOPInstanceUID for s in sources}


def test_real_sources_give_valid_objects(shared_dicom: Path, tmp_path: Path) -> None:
    for path in chest_sources(shared_dicom):
        source = pydicom.dcmread(path)
        gsps = build_hotspot_gsps(scored(source, 0.8), make_model())
        assert gsps is not None
        _valid(write_dataset(gsps, tmp_path), path)
        _valid(write_dataset(build_positive_kos([source], make_model()), tmp_path), path)


def test_off_by_default_and_on_when_asked(make_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from worker.outputs import _viewer_objects

    sources = [make_cxr(rows=64, cols=64)]
    positive = make_result(sources, [0.9])
    negative = make_result(sources, [0.1])
    default = make_settings()
    assert not default.hotspot_presentation_state and not default.key_object_for_positive
    assert _viewer_objects(positive, default, tmp_path) == []
    on = make_settings(hotspot_presentation_state=True, key_object_for_positive=True)
    assert sorted(o.kind for o in _viewer_objects(positive, on, tmp_path)) == ["gsps", "kos"]
    assert [o.kind for o in _viewer_objects(negative, on, tmp_path)] == ["gsps"]


@pytest.mark.orthanc
def test_orthanc_stores_both_over_one_association(orthanc_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    orthanc = orthanc_factory()
    source = make_cxr(rows=128, cols=128)
    gsps = build_hotspot_gsps(scored(source, 0.8), make_model())
    assert gsps is not None
    paths = [write_dataset(gsps, tmp_path),
             write_dataset(build_positive_kos([source], make_model()), tmp_path)]
    outcomes = send_files(paths, Destination(orthanc.aet, "127.0.0.1", orthanc.dicom_port),
                          "CXR_TRIAGE", timeout=20)
    assert all(o.ok for o in outcomes), [o.reason for o in outcomes]
    for path in paths:
        hits = orthanc.post("/tools/lookup", raw=path.stem.encode())
        assert [h["Type"] for h in hits] == ["Instance"]


@pytest.mark.parametrize(("body_part", "side", "expected"), [
    ("CHEST", None, ("CHEST", None)),  # an unpaired part: no Laterality at all
    ("HAND", "R", ("HAND", "R")),  # a paired part: its stated side is copied beside it
    (None, None, (None, "")),  # no body part: Laterality present and empty
])
def test_gsps_and_sc_share_one_laterality_rule(
        tmp_path: Path, body_part: str | None, side: str | None,
        expected: tuple[str | None, str | None]) -> None:
    from dicom_node.sc import build_heatmap_sc

    source = make_cxr(rows=96, cols=96, body_part=body_part)
    if side is not None:
        source.Laterality = side
    image = scored(source, 0.7)
    gsps = build_hotspot_gsps(image, make_model())
    assert gsps is not None
    for built in (gsps, build_heatmap_sc(image, make_model())):
        path = write_dataset(built, tmp_path)
        _valid(path)
        back = pydicom.dcmread(path)
        laterality = back.Laterality if "Laterality" in back else None
        assert (back.get("BodyPartExamined"), laterality) == expected
