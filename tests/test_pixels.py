"""The pixel pipeline on synthetic encodings, DCMTK-compressed files and the real shared
DICOM files: values, orientation, errors."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from db.errors import (
    MissingPixelDataError,
    MultiFrameError,
    UndecodablePixelsError,
    UnsupportedImageError,
)
from dicom_node.pixels import decode_pixels, load_image_file
from tests.support.dicom_factory import make_cxr, write


def roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def ramp(rows: int, cols: int, lo: int, hi: int, dtype: type) -> np.ndarray:
    """A horizontal ramp from lo (left) to hi (right)."""
    row = np.linspace(lo, hi, cols)
    return np.tile(row, (rows, 1)).round().astype(dtype)


def test_eight_bit_monochrome2_is_scaled_like_a_png() -> None:
    px = ramp(32, 64, 0, 255, np.uint8)
    out = decode_pixels(make_cxr(bits_stored=8, pixels=px))
    assert out.dtype == np.float32 and out.shape == (32, 64)
    np.testing.assert_allclose(out, px / 255.0, atol=1e-6)


def test_monochrome1_is_inverted() -> None:
    px = ramp(16, 32, 0, 255, np.uint8)
    m2 = decode_pixels(make_cxr(bits_stored=8, pixels=px))
    m1 = decode_pixels(make_cxr(bits_stored=8, pixels=px, photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[0, 0] == pytest.approx(1.0) and m1[0, -1] == pytest.approx(0.0)


@pytest.mark.parametrize("bits", [12, 16])
def test_high_bit_depth_without_window_uses_robust_range(bits: int) -> None:
    px = ramp(64, 128, 100, 2**bits - 100, np.uint16)
    px[0, 0] = 0  # a single outlier does not stretch the range
    out = decode_pixels(make_cxr(bits_stored=bits, pixels=px))
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(np.diff(out[5]) >= 0)  # still monotonic left to right
    assert 0.45 < float(out[5, 64]) < 0.55


def test_bits_stored_masks_unused_high_bits() -> None:
    px = ramp(16, 64, 0, 4095, np.uint16)
    dirty = px | np.uint16(0xF000)  # garbage above bit 11 must be ignored
    ds = make_cxr(bits_stored=12, pixels=dirty)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    out = decode_pixels(roundtrip(ds))
    np.testing.assert_allclose(out[0], px[0] / 4095.0, atol=2e-3)


def test_signed_data_with_rescale_and_window() -> None:
    hu = ramp(16, 64, -1024, 1023, np.int16)
    ds = make_cxr(bits_stored=12, signed=True, pixels=hu)
    ds.RescaleSlope, ds.RescaleIntercept = 2, 100  # values = 2 * stored + 100
    ds.WindowCenter, ds.WindowWidth = 100, 4096  # covers [-1948, 2148)
    out = decode_pixels(roundtrip(ds))
    values = 2.0 * hu + 100
    expected = np.clip((values - (100 - 0.5)) / 4095 + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out[0, 0] < 0.05 and out[0, -1] > 0.95


def test_window_first_of_several_values_and_clipping() -> None:
    px = ramp(8, 100, 0, 4000, np.uint16)
    ds = make_cxr(bits_stored=12, pixels=px)
    ds.WindowCenter = [1000, 3000]
    ds.WindowWidth = [1000, 500]
    out = decode_pixels(roundtrip(ds))
    below, above = px[0] < 500, px[0] >= 1500
    assert np.all(out[0][below] == 0.0) and np.all(out[0][above] == 1.0)
    mid = np.argmin(np.abs(px[0].astype(int) - 1000))
    assert out[0, mid] == pytest.approx(0.5, abs=0.02)


def test_sigmoid_voi_function() -> None:
    px = ramp(4, 64, 0, 4095, np.uint16)
    ds = make_cxr(bits_stored=12, pixels=px)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2048, 1024, "SIGMOID"
    out = decode_pixels(roundtrip(ds))
    assert 0 < out.min() < 0.01 and 0.99 < out.max() < 1
    assert out[0, np.argmin(np.abs(px[0].astype(int) - 2048))] == pytest.approx(0.5, abs=0.05)


def test_voi_lut_sequence_takes_precedence_over_window() -> None:
    px = ramp(4, 64, 0, 4095, np.uint16)
    ds = make_cxr(bits_stored=12, pixels=px)
    ds.WindowCenter, ds.WindowWidth = 0, 2  # would make almost everything white
    item = Dataset()
    lut = (4095 - np.arange(4096)) // 16  # an inverting LUT with 12-bit output
    item.add_new("LUTDescriptor", "US", [4096, 0, 12])
    item.add_new("LUTData", "US", [int(v) for v in lut])
    ds.VOILUTSequence = Sequence([item])
    out = decode_pixels(roundtrip(ds))
    np.testing.assert_allclose(out[0], ((4095 - px[0]) // 16) / 4095.0, atol=1e-6)


@pytest.mark.parametrize(
    "syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=lambda s: s.name
)
def test_lossless_compressed_decode_identically(syntax: pydicom.uid.UID) -> None:
    ds = make_cxr(bits_stored=12, seed=3)
    expected = decode_pixels(ds)
    ds.compress(syntax)
    out = decode_pixels(roundtrip(ds))
    np.testing.assert_array_equal(out, expected)


def test_deflated_transfer_syntax() -> None:
    ds = make_cxr(bits_stored=12, seed=4)
    expected = decode_pixels(ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = decode_pixels(roundtrip(ds))
    np.testing.assert_array_equal(out, expected)


def test_implicit_vr_file(tmp_path: Path) -> None:
    ds = make_cxr(bits_stored=12, seed=5)
    expected = decode_pixels(ds)
    path = write(ds, tmp_path / "implicit.dcm", implicit=True)
    np.testing.assert_array_equal(load_image_file(path), expected)


@pytest.mark.dcmtk
@pytest.mark.parametrize(
    ("flag", "bits", "lossless"),
    [("+e1", 12, True), ("+el", 12, True), ("+eb", 8, False), ("+ee", 12, False)],
    ids=["lossless-sv1", "lossless", "baseline", "extended"],
)
def test_jpeg_family_from_dcmtk(tmp_path: Path, flag: str, bits: int, lossless: bool) -> None:
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("DCMTK's dcmcjpeg is not installed")
    ds = make_cxr(bits_stored=bits, seed=6, rows=64, cols=96)
    expected = decode_pixels(ds)
    src = write(ds, tmp_path / "src.dcm")
    dst = tmp_path / "jpeg.dcm"
    # +sr keeps the stored range (DCMTK otherwise stretches min/max pixel values).
    subprocess.run(["dcmcjpeg", flag, "+sr", str(src), str(dst)], check=True,
                   capture_output=True)
    assert pydicom.dcmread(dst).file_meta.TransferSyntaxUID.is_compressed
    out = load_image_file(dst)
    assert out.shape == expected.shape
    if lossless:
        np.testing.assert_array_equal(out, expected)
    else:
        assert float(np.abs(out - expected).mean()) < 0.02


def test_missing_pixel_data() -> None:
    ds = make_cxr()
    del ds.PixelData
    with pytest.raises(MissingPixelDataError):
        decode_pixels(ds)


def test_truncated_pixel_data_is_undecodable() -> None:
    ds = make_cxr(bits_stored=12, rows=64, cols=64)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(UndecodablePixelsError):
        decode_pixels(roundtrip(ds))


def test_truncated_compressed_pixel_data_is_undecodable() -> None:
    ds = make_cxr(bits_stored=12, rows=64, cols=64)
    ds.compress(JPEG2000Lossless)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    with pytest.raises(UndecodablePixelsError):
        decode_pixels(roundtrip(ds))


def test_multi_frame_is_rejected() -> None:
    frames = np.stack([ramp(16, 16, 0, 255, np.uint8)] * 3)
    ds = make_cxr(bits_stored=8, rows=16, cols=16)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    with pytest.raises(MultiFrameError):
        decode_pixels(roundtrip(ds))


def test_rgb_secondary_capture_becomes_luminance() -> None:
    ds = make_cxr(bits_stored=8, rows=8, cols=8)
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 128, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    out = decode_pixels(roundtrip(ds))
    assert out.shape == (8, 8)
    assert out[0, 0] == pytest.approx((0.299 * 255 + 0.587 * 128) / 255, abs=1e-4)


def test_palette_colour_is_unsupported() -> None:
    ds = make_cxr(bits_stored=8)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(UnsupportedImageError):
        decode_pixels(ds)


def test_png_and_jpeg_files(tmp_path: Path) -> None:
    px = ramp(20, 40, 0, 255, np.uint8)
    Image.fromarray(px).save(tmp_path / "a.png")
    Image.fromarray(np.stack([px] * 3, -1)).save(tmp_path / "b.jpg", quality=95)
    Image.fromarray(ramp(20, 40, 0, 65535, np.uint16)).save(tmp_path / "c.png")
    png = load_image_file(tmp_path / "a.png")
    np.testing.assert_allclose(png, px / 255.0, atol=1e-6)
    jpg = load_image_file(tmp_path / "b.jpg")
    assert jpg.shape == (20, 40) and float(np.abs(jpg - px / 255.0).mean()) < 0.02
    png16 = load_image_file(tmp_path / "c.png")
    assert png16.min() == 0.0 and png16.max() == 1.0
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(UndecodablePixelsError):
        load_image_file(tmp_path / "junk.png")


@pytest.mark.shared_data
def test_real_shared_dicom_files(shared_dicom: Path) -> None:
    files = sorted(shared_dicom.glob("*.dcm"))
    assert len(files) == 4
    for path in files:
        ds = pydicom.dcmread(path)
        out = load_image_file(path)
        assert out.dtype == np.float32
        assert out.shape == (ds.Rows, ds.Columns)
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        assert float(out.std()) > 0.1  # a real radiograph, not a flat field
    jpeg = next(p for p in files if pydicom.dcmread(p).file_meta.TransferSyntaxUID
                == pydicom.uid.JPEGBaseline8Bit)
    out = load_image_file(jpeg)
    # Lungs are dark and the mediastinum bright on a frontal MONOCHROME2 chest film.
    h, w = out.shape
    band = out[h // 3 : h // 2]
    lungs = (band[:, w // 5 : w // 3].mean() + band[:, -w // 3 : -w // 5].mean()) / 2
    spine = band[:, w // 2 - 30 : w // 2 + 30].mean()
    assert spine > lungs
