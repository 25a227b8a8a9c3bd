"""Crafted DICOM files for the hostile-input suite: valid file meta around whatever bytes a
careless or hostile sender may put in the data set (invalid UIDs, cut elements, garbage,
impossible pixel descriptions).  Made on the fly; never patient data."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    generate_uid,
)

from tests.support.dicom_factory import CR_STORAGE as CR_STORAGE
from tests.support.dicom_factory import make_cxr

DX = str(DigitalXRayImageStorageForPresentation)
DX_PROCESSING = str(DigitalXRayImageStorageForProcessing)
CT = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass(frozen=True)
class Crafted:
    """A file to send: its bytes, the presentation context it goes in, and its UIDs."""

    data: bytes
    context_sop_class: str
    transfer_syntax: str
    study_uid: str
    sop_uid: str


def encode_body(ds: Dataset, implicit: bool = False) -> bytes:
    """The data set's bytes (little endian), with validation of values switched off."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    with pydicom.config.disable_value_validation():
        write_dataset(fp, ds)
    return fp.getvalue()


def file_bytes(body: bytes, sop_class: str, transfer_syntax: str,
               meta_sop_uid: str | None = None) -> bytes:
    """Preamble, ``DICM`` and valid File Meta Information in front of ``body``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = meta_sop_uid or generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue() + body


def cxr(**kwargs: object) -> Dataset:
    """A small frontal DX phantom (fresh UIDs) to start a crafted case from."""
    kwargs.setdefault("rows", 32)
    kwargs.setdefault("cols", 32)
    return make_cxr(**kwargs)  # type: ignore[arg-type]


def crafted(ds: Dataset, body: bytes | None = None, context: str | None = None,
            transfer_syntax: str = str(ExplicitVRLittleEndian)) -> Crafted:
    context = context or str(ds.get("SOPClassUID") or DX)
    study = str(ds.get("StudyInstanceUID", ""))
    sop = str(ds.get("SOPInstanceUID", ""))
    data = body if body is not None else encode_body(ds)
    return Crafted(file_bytes(data, context, transfer_syntax), context, transfer_syntax,
                   study, sop)


def with_values(**values: object) -> Crafted:
    """A phantom with attributes set (or deleted where the value is None), as sent."""
    ds = cxr()
    context = str(ds.SOPClassUID)
    for keyword, value in values.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            with pydicom.config.disable_value_validation():
                setattr(ds, keyword, value)
    return crafted(ds, context=context)


def cut_inside(ds: Dataset, marker: bytes, keep: int) -> Crafted:
    """The data set's bytes cut ``keep`` bytes after the first occurrence of ``marker``."""
    body = encode_body(ds)
    at = body.index(marker)
    return crafted(ds, body[: at + keep])


def long_comment_cut() -> Crafted:
    """A data set cut inside an 8 KiB element before Pixel Data (read deferred)."""
    ds = cxr()
    ds.ImageComments = "C" * 8000
    return cut_inside(ds, b"CCCC", 100)


def short_element_cut() -> Crafted:
    ds = cxr()
    ds.StudyDescription = "D" * 40
    return cut_inside(ds, b"DDDD", 10)


def pixel_data_cut() -> Crafted:
    ds = cxr()
    body = encode_body(ds)
    return crafted(ds, body[:-500])


def huge_length_in_header() -> Crafted:
    """An element whose 32-bit length claims nearly 4 GiB, before Pixel Data."""
    ds = cxr()
    body = encode_body(ds)
    tag = struct.pack("<HH", 0x0020, 0x4000) + b"LT"
    forged = tag + struct.pack("<H", 0xFFF0) + b"x" * 16
    at = body.index(struct.pack("<HH", 0x0028, 0x0002))
    return crafted(ds, body[:at] + forged)


def garbage(size: int, seed: int) -> Crafted:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
    return Crafted(file_bytes(data, DX, str(ExplicitVRLittleEndian)), DX,
                   str(ExplicitVRLittleEndian), "", "")


def deflated_garbage() -> Crafted:
    data = b"this is not deflate data" * 10
    return Crafted(file_bytes(data, DX, DEFLATED), DX, DEFLATED, "", "")


def sop_class_in_context(sop_class: str, context: str) -> Crafted:
    ds = cxr()
    ds.SOPClassUID = sop_class
    return crafted(ds, context=context)


def two_uids_sharing_64(prefix_field: str) -> tuple[Crafted, Crafted]:
    """Two instances whose UID in ``prefix_field`` differ only after character 64."""
    base = "1.2.826.0.1.3680043.8.498." + "1" * 38  # 64 characters
    assert len(base) == 64
    out = []
    for last in ("1", "2"):
        ds = cxr()
        with pydicom.config.disable_value_validation():
            setattr(ds, prefix_field, base + "." + last)
        out.append(crafted(ds))
    return out[0], out[1]


def pixels_mismatch(rows: int, cols: int, data_len: int) -> Crafted:
    ds = cxr()
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = b"\x01\x02" * (data_len // 2)
    return crafted(ds)


def bit_depth(allocated: int, stored: int) -> Crafted:
    ds = cxr()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, max(stored - 1, 0)
    return crafted(ds)


def multi_frame() -> Crafted:
    ds = cxr()
    frame = np.asarray(ds.pixel_array)
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([frame, frame]).tobytes()
    return crafted(ds)


def modality_lut_12_bit(study_uid: str | None = None) -> Crafted:
    """A Modality LUT with 12-bit entries: pydicom raises a TypeError decoding it."""
    ds = cxr(study_uid=study_uid, instance_number=2)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.ModalityLUTType = "HU"
    item.add_new(0x00283006, "US", list(range(4096)))
    ds.ModalityLUTSequence = Sequence([item])
    return crafted(ds)


def for_processing() -> Crafted:
    ds = cxr()
    ds.SOPClassUID = DX_PROCESSING
    ds.PresentationIntentType = "FOR PROCESSING"
    return crafted(ds)


def photometric(value: str, samples: int = 1) -> Crafted:
    ds = cxr()
    ds.PhotometricInterpretation = value
    ds.SamplesPerPixel = samples
    return crafted(ds)


def no_pixel_data() -> Crafted:
    ds = cxr()
    del ds.PixelData
    return crafted(ds)


def jpeg_claimed_raw_sent() -> Crafted:
    """Native pixel bytes under a JPEG Baseline transfer syntax (not encapsulated)."""
    ds = cxr(bits_stored=8)
    return crafted(ds, transfer_syntax=JPEG_BASELINE)


def lateral() -> Crafted:
    return crafted(cxr(view_position="LL"))


def good() -> Crafted:
    return crafted(cxr())


def write_crafted(case: Crafted, directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.dcm"
    path.write_bytes(case.data)
    return path


Builder = Callable[[], Crafted]
