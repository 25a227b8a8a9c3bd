"""Selection of the instances to score, from headers only, with recorded reasons."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from db.settings import DEFAULT_SELECTION_RULES, load_settings
from dicom_node.selection import image_count, select_instances
from tests.support.dicom_factory import make_cxr, write

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
CR = "1.2.840.10008.5.1.4.1.1.1"


def header(modality: str = "CR", view: str | None = "PA", body: str | None = "CHEST",
           sop_class: str = CR) -> dict[str, object]:
    h: dict[str, object] = {"Modality": modality, "SOPClassUID": sop_class, "Rows": 64}
    if view is not None:
        h["ViewPosition"] = view
    if body is not None:
        h["BodyPartExamined"] = body
    return h


def verdicts(headers: list[dict[str, object]]) -> list[tuple[bool, str | None]]:
    return [(s.scored, s.reason) for s in select_instances(headers, DEFAULT_SELECTION_RULES)]


def test_frontal_cr_and_dx_are_scored_with_the_rule_named() -> None:
    sel = select_instances([header("CR", "PA"), header("DX", "AP")], DEFAULT_SELECTION_RULES)
    assert [s.scored for s in sel] == [True, True]
    assert [s.index for s in sel] == [0, 1]
    assert sel[0].rule == "frontal CR/DX" and sel[0].reason is None


def test_lateral_view_is_skipped_with_reason() -> None:
    out = verdicts([header("DX", "PA"), header("DX", "LL")])
    assert out[0] == (True, None)
    assert out[1] == (False, "lateral view (ViewPosition LL)")


def test_no_view_position_only_on_a_single_image_study() -> None:
    single = verdicts([header("DX", None, None)])
    assert single == [(True, None)]
    two = verdicts([header("DX", None, None), header("DX", None, None)])
    assert all(not scored for scored, _ in two)
    assert "no ViewPosition" in str(two[0][1]) and "2 images" in str(two[0][1])


def test_non_chest_and_non_image_objects() -> None:
    out = verdicts([
        header("OT", None, "ABDOMEN", SC),
        header("SR", None, None, BASIC_TEXT_SR),
        header("PR", None, None, GSPS),
        header("CR", "AP", "CHEST"),
    ])
    assert out[0] == (False, "not a chest image (Modality OT, BodyPartExamined ABDOMEN)")
    assert out[1] == (False, "not an image (SOP class Basic Text SR Storage)")
    assert out[2][0] is False and str(out[2][1]).startswith("not an image")
    assert out[3] == (True, None)
    # SR and presentation states do not count as images of the study.
    assert image_count([header("DX", None, None), header("SR", None, None, BASIC_TEXT_SR)]) == 1


def test_chest_secondary_capture_is_scored() -> None:
    assert verdicts([header("OT", "", "chest", SC)]) == [(True, None)]
    out = verdicts([header("OT", "PA", "CHEST", SC), header("OT", "AP", "chest", SC)])
    assert out == [(True, None), (True, None)]


def test_viewless_images_in_a_multi_image_study_are_not_guessed() -> None:
    """Without ViewPosition, one of two chest images may be the lateral: skip, with a reason."""
    out = verdicts([header("OT", "", "CHEST", SC), header("DX", "", "CHEST", SC)])
    assert [scored for scored, _ in out] == [False, False]
    assert all(reason for _, reason in out)


def test_frontal_view_of_another_body_part_is_not_scored() -> None:
    assert verdicts([header("DX", "PA", "HAND")])[0][0] is False


def test_rules_are_data_from_settings() -> None:
    rules = [{"name": "only PA", "Modality": ["DX"], "ViewPosition": ["PA"]}]
    s = load_settings(env={"CXR_SELECTION_RULES": '[{"name": "only PA", '
                                                   '"Modality": ["DX"], "ViewPosition": ["PA"]}]'})
    assert [dict(r) for r in s.selection_rules] == rules
    sel = select_instances([header("DX", "AP"), header("DX", "PA")], s.selection_rules)
    assert [x.scored for x in sel] == [False, True]
    assert sel[0].reason == "not a frontal view (ViewPosition AP, Modality DX)"


def test_works_from_datasets_read_without_pixels(tmp_path: Path) -> None:
    study = generate_uid()
    frontal = write(make_cxr(study_uid=study, view_position="PA"), tmp_path / "pa.dcm")
    lateral = write(make_cxr(study_uid=study, view_position="LL"), tmp_path / "ll.dcm")
    sr = Dataset()
    sr.SOPClassUID, sr.Modality = BASIC_TEXT_SR, "SR"
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in (frontal, lateral)] + [sr]
    assert "PixelData" not in headers[0]
    out = [(s.scored, s.reason) for s in select_instances(headers, DEFAULT_SELECTION_RULES)]
    assert out[0] == (True, None)
    assert out[1] == (False, "lateral view (ViewPosition LL)")
    assert out[2] == (False, "not an image (SOP class Basic Text SR Storage)")


@pytest.mark.shared_data
def test_real_files_chest_scored_abdomen_skipped(shared_dicom: Path) -> None:
    for path in sorted(shared_dicom.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        (sel,) = select_instances([ds], DEFAULT_SELECTION_RULES)
        if path.name == "nonchest_abdomen_OT_sample.dcm":
            assert not sel.scored
            assert sel.reason is not None and sel.reason.startswith("not a chest image")
        else:
            assert sel.scored, f"{path.name}: {sel.reason}"
