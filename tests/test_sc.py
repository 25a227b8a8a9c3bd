"""The heatmap Secondary Capture: valid, referencing its source, legible picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from dicom_node.burnin import MAX_SIDE, Caption, colorize, overlay, render, target_size
from dicom_node.results import ScoredImage, write_dataset
from dicom_node.sc import SC_SERIES_DESCRIPTION, build_heatmap_sc
from tests.support.dicom_factory import make_cxr
from tests.support.results_factory import (
    chest_sources,
    dciodvfy,
    make_model,
    pixels01,
    scored,
    unexpected_warnings,
)


def _check(ds: pydicom.Dataset, directory: Path) -> pydicom.Dataset:
    path = write_dataset(ds, directory)
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    assert unexpected_warnings(warnings) == [], warnings
    return pydicom.dcmread(path)


def test_sc_of_a_phantom_validates_and_references_its_source(tmp_path: Path) -> None:
    source = make_cxr(rows=256, cols=256, patient_name="Müller^Jürgen",
                      charset="ISO_IR 192", study_uid=generate_uid())
    model = make_model()
    back = _check(build_heatmap_sc(scored(source, 0.81), model), tmp_path)

    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.SeriesDescription == SC_SERIES_DESCRIPTION
    assert back.BurnedInAnnotation == "YES"
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
    assert str(back.PatientName) == "Müller^Jürgen"
    assert back.SpecificCharacterSet == "ISO_IR 192"
    ref = back.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    assert "POSITIVE" in back.ImageComments and model.version in back.ImageComments
    assert "NOT FOR DIAGNOSTIC USE" in back.ImageComments
    equipment = [e for e in back.ContributingEquipmentSequence
                 if e.get("ManufacturerModelName") == model.name]
    assert equipment[0].SoftwareVersions == model.version
    assert equipment[0].DeviceSerialNumber == model.sha256
    # Never upscaled: the radiograph keeps its 256 rows under the caption banner.
    pixels = back.pixel_array
    assert pixels.shape[0] > 256 and pixels.shape[0] < 256 * 2
    assert pixels.dtype == np.uint8


def test_overlay_colours_hot_regions_and_leaves_cold_ones_grey() -> None:
    image = np.full((64, 64), 0.5, dtype=np.float32)
    heat = np.zeros((64, 64), dtype=np.float32)
    heat[:, :32] = 1.0
    out = overlay(image, heat)
    hot, cold = out[:, :28].reshape(-1, 3), out[:, 36:].reshape(-1, 3)
    assert np.all(cold[:, 0] == cold[:, 1]) and np.all(cold[:, 1] == cold[:, 2])
    expected = (0.45 * 127.5 + 0.55 * colorize(np.array(1.0)).astype(float))
    assert np.allclose(hot.mean(axis=0), expected, atol=2)


def test_render_draws_caption_and_colour_bar() -> None:
    image = np.zeros((200, 300), dtype=np.float32)
    heat = np.zeros_like(image)
    caption = Caption(0.3, 0.5, "m", "v1", "gradcam")
    assert caption.lines()[0].endswith("NEGATIVE (threshold 0.50)")
    out = render(image, heat, caption)
    banner = out.shape[0] - 200
    assert banner > 0 and out.shape[1] > 300
    assert out[:banner].max() > 200, "no caption text drawn"
    bar = out[banner:, 300:312]  # the colour strip, left of its labels and title
    top, bottom = bar[20:30].reshape(-1, 3), bar[-30:-20].reshape(-1, 3)
    # The bar's top shows the hot end of the scale and its bottom the cold end.
    assert top[:, 0].max() > top[:, 2].max()
    assert bottom[:, 2].max() > bottom[:, 0].max()
    without = render(image, None, caption)
    assert without.shape[1] == 300


def test_caption_wraps_on_small_pictures_instead_of_running_off() -> None:
    caption = Caption(0.81, 0.42, "a-rather-long-model-name", "2024.05.1", "occlusion")
    out = render(np.zeros((96, 96), dtype=np.float32), None, caption)
    banner = out[: out.shape[0] - 96]
    assert out.shape[1] == 96
    lit_rows = np.flatnonzero(banner.max(axis=(1, 2)) > 100)
    # More text rows than the three caption lines: they wrapped.
    gaps = np.count_nonzero(np.diff(lit_rows) > 1)
    assert gaps + 1 > 3
    assert banner[:, -2:].max() < 100, "text touches the right edge"


def test_target_size_never_upscales() -> None:
    assert target_size(256, 200) == (256, 200)
    assert target_size(2048, 1536) == (MAX_SIDE, 768)


def test_sc_from_each_real_shared_file_validates(shared_dicom: Path, tmp_path: Path) -> None:
    model = make_model()
    for path in chest_sources(shared_dicom):
        source = pydicom.dcmread(path)
        back = _check(build_heatmap_sc(scored(source, 0.3), model), tmp_path / path.stem)
        assert back.StudyInstanceUID == source.StudyInstanceUID
        assert "PatientAge" not in back
        assert back.Columns <= MAX_SIDE + 200 and back.Rows <= MAX_SIDE + 200
        Image.fromarray(back.pixel_array).save(tmp_path / f"{path.stem}.png")
        assert (tmp_path / f"{path.stem}.png").stat().st_size > 10_000


def test_sc_without_heatmap_still_carries_the_caption(tmp_path: Path) -> None:
    source = make_cxr(rows=128, cols=96)
    item = ScoredImage(source=source, probability=0.9, heatmap=None,
                       image01=pixels01(source))
    back = _check(build_heatmap_sc(item, make_model()), tmp_path)
    assert back.Columns == 96
    assert "POSITIVE" in back.ImageComments


@pytest.mark.parametrize("shape", [(3, 64, 64), (64,)])
def test_overlay_rejects_non_2d_images(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        overlay(np.zeros(shape, dtype=np.float32), None)


# --------------------------------------------------------- what the source says, carried
@pytest.mark.parametrize(
    ("stated", "syntax", "expected"),
    [
        ({"LossyImageCompression": "01", "LossyImageCompressionRatio": "12.5",
          "LossyImageCompressionMethod": "ISO_10918_1"}, None,
         ("01", "12.5", "ISO_10918_1")),
        ({}, "1.2.840.10008.1.2.4.50", ("01", None, "ISO_10918_1")),
        ({"LossyImageCompression": "00"}, None, ("00", None, None)),
        ({}, None, (None, None, None)),
    ],
)
def test_lossy_image_compression_is_carried_from_the_source(  # type: ignore[no-untyped-def]
        tmp_path: Path, stated, syntax, expected) -> None:
    source = make_cxr(rows=64, cols=64)
    for keyword, value in stated.items():
        setattr(source, keyword, value)
    image = scored(source, 0.4)
    if syntax:
        source.file_meta.TransferSyntaxUID = syntax  # from here on only the header is read
    sc = _check(build_heatmap_sc(image, make_model()), tmp_path)
    got = tuple(str(sc[k].value) if k in sc else None
                for k in ("LossyImageCompression", "LossyImageCompressionRatio",
                          "LossyImageCompressionMethod"))
    assert got == expected


@pytest.mark.parametrize("value", ["YES", "NO", None])
def test_recognizable_visual_features_is_copied_never_asserted(tmp_path: Path,
                                                               value: str | None) -> None:
    source = make_cxr(rows=64, cols=64)
    if value:
        source.RecognizableVisualFeatures = value
    sc = _check(build_heatmap_sc(scored(source, 0.4), make_model()), tmp_path)
    assert sc.get("RecognizableVisualFeatures") == value


def test_colour_bar_is_titled_as_attention_not_probability(tmp_path: Path) -> None:
    from dicom_node.burnin import BAR_TITLE

    image = np.zeros((300, 200), dtype=np.float32)
    out = render(image, np.zeros_like(image), Caption(0.3, 0.5, "m", "v1", "gradcam"))
    banner = out.shape[0] - 300
    bar = out[banner:, 200:]
    # The title column, right of the tick labels, has white text along the bar.
    title_column = bar[:, -12:]
    assert (title_column.max(axis=2) > 200).sum() > 50
    sc = build_heatmap_sc(scored(make_cxr(rows=64, cols=64), 0.4), make_model())
    assert BAR_TITLE in sc.ImageComments
