"""Synthetic DICOM instances for tests: real encodings, made on the fly, never patient data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def make_cxr(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    rows: int = 64,
    cols: int = 64,
    bits_stored: int = 12,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    view_position: str | None = "PA",
    body_part: str | None = "CHEST",
    pixels: np.ndarray | None = None,
    patient_name: str = "Test^Phantom",
    patient_id: str = "PHANTOM-1",
    charset: str | None = None,
    seed: int = 0,
    instance_number: int = 1,
) -> Dataset:
    """A frontal chest radiograph phantom with uncompressed pixels."""
    rng = np.random.default_rng(seed)
    bits_allocated = 16 if bits_stored > 8 else 8
    if pixels is None:
        hi = 2**bits_stored - 1
        yy, xx = np.mgrid[0:rows, 0:cols]
        base = (0.3 + 0.4 * np.exp(-(((xx - cols / 2) / (cols / 3)) ** 2))) * hi
        base = base + rng.normal(0, hi * 0.02, size=(rows, cols))
        pixels = np.clip(base, 0, hi)
        if signed:
            pixels = pixels - 2 ** (bits_stored - 1)
        dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[
            (bits_allocated, signed)
        ]
        pixels = pixels.astype(dtype)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = DigitalXRayImageStorageForPresentation if modality == "DX" else CR_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Modality = modality
    if view_position is not None:
        ds.ViewPosition = view_position
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.Manufacturer = "phantom"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.tobytes()
    ds.set_original_encoding(False, True)
    return ds


def write(ds: Dataset, path: Path, implicit: bool = False) -> Path:
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.set_original_encoding(True, True)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_study_files(directory: Path, n: int = 3, **kwargs: object) -> list[Path]:
    """``n`` instances of one study written under ``directory``."""
    study_uid = str(kwargs.pop("study_uid", None) or generate_uid())
    series_uid = generate_uid()
    paths = []
    for i in range(n):
        ds = make_cxr(study_uid=study_uid, series_uid=series_uid, seed=i, instance_number=i + 1,
                      **kwargs)  # type: ignore[arg-type]
        paths.append(write(ds, directory / f"{ds.SOPInstanceUID}.dcm"))
    return paths
