"""The heatmap picture we send back to the PACS: an RGB Secondary Capture.

One per scored source image, in its own series of the source's study. The picture (see
:mod:`dicom_node.burnin`) carries the probability, the call, the model version and "NOT
FOR DIAGNOSTIC USE" as burned-in text, so Burned In Annotation is YES. The Source Image
Sequence points at the radiograph it was computed from.
"""

from __future__ import annotations

import logging

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node import identity
from dicom_node.burnin import BAR_TITLE, MAX_SIDE, Caption, render
from dicom_node.conformance import (
    build_charset,
    copy_laterality,
    no_person_name_warnings,
    restore_source_text,
    sanitise_source,
)
from dicom_node.results import OutputModel, ScoredImage
from dicom_node.sr_content import contributing_equipment

log = logging.getLogger(__name__)

SC_SERIES_DESCRIPTION = "AI HEATMAP - NOT FOR DIAGNOSTIC USE"
_ORIENTATION_LETTERS = frozenset("APLRHF")
# Changes whenever this module changes what it writes, so new content gets new UIDs.
_BUILD = "sc-2"


def _source_orientation(header: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation where highdicom can take it as it is."""
    value = header.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, col = str(value[0]), str(value[1])
    if row in _ORIENTATION_LETTERS and col in _ORIENTATION_LETTERS:
        return row, col
    return None


# Lossy transfer syntaxes and the Lossy Image Compression Method each one means (PS3.3
# C.7.6.1.1.5.1).
_LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # HTJ2K
    "1.2.840.10008.1.2.4.100": "ISO_13818_2",  # MPEG2
}


def _carry_lossy_compression(sc: Dataset, header: Dataset) -> None:
    """Lossy Image Compression of a derived image: "01" once any ancestor was lossy
    (PS3.3 C.7.6.1.1.5), with the source's ratio and method where it states them, or the
    method its transfer syntax implies."""
    stated = str(header.get("LossyImageCompression", "") or "")
    ts = str(getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", "") or "")
    lossy = stated == "01" or ts in _LOSSY_METHODS
    if not lossy:
        if stated == "00":
            sc.LossyImageCompression = "00"
        return
    sc.LossyImageCompression = "01"
    if header.get("LossyImageCompressionRatio"):
        sc.LossyImageCompressionRatio = header.LossyImageCompressionRatio
    if header.get("LossyImageCompressionMethod"):
        sc.LossyImageCompressionMethod = header.LossyImageCompressionMethod
    elif ts in _LOSSY_METHODS:
        sc.LossyImageCompressionMethod = _LOSSY_METHODS[ts]


def _instance_number(header: Dataset) -> int:
    value = header.get("InstanceNumber")
    try:
        number = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return 1
    return number if number > 0 else 1


def build_heatmap_sc(scored: ScoredImage, model: OutputModel, max_side: int = MAX_SIDE,
                     institution_name: str | None = None) -> Dataset:
    """The Secondary Capture of one scored image's heatmap over the radiograph."""
    header = sanitise_source(scored.source)
    caption = Caption(
        probability=float(scored.probability),
        threshold=float(model.threshold),
        model_name=model.name,
        model_version=model.version,
        heatmap_method=model.heatmap_method,
        pneumonia_probability=scored.pneumonia_probability,
        pneumonia_threshold=model.pneumonia_threshold,
    )
    pixels = render(scored.image01, scored.heatmap, caption, max_side=max_side)
    study_uid = str(header.StudyInstanceUID)
    source_uid = str(header.SOPInstanceUID)
    digest = identity.content_digest(
        _BUILD, hd.__version__, pydicom.__version__, header, scored.image01,
        scored.heatmap, float(scored.probability),
        [model.name, model.version, model.sha256, model.architecture, model.threshold,
         model.heatmap_method, model.manufacturer],
        max_side, institution_name or None,
    )
    orientation = _source_orientation(header)
    with no_person_name_warnings():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=identity.series_uid(identity.SC, study_uid, model.version,
                                                    model.sha256),
            series_number=identity.series_number(identity.SC, model.version),
            sop_instance_uid=identity.instance_uid(identity.SC, [source_uid], model.version,
                                                   model.sha256, digest),
            instance_number=_instance_number(header),
            manufacturer=model.manufacturer[:64],
            # highdicom insists on an orientation for the PATIENT system; where the source
            # has none we pass a placeholder and empty it below (Type 2C allows empty), so
            # no orientation is invented.
            patient_orientation=orientation or ("L", "F"),
            contributing_equipment=[contributing_equipment(model)],
            transfer_syntax_uid=ExplicitVRLittleEndian,
            specific_character_set=build_charset(header),
        )
    if orientation is None:
        sc.PatientOrientation = None  # type: ignore[assignment]
    # Faithful copy of the Patient and Study modules beyond highdicom's core attributes.
    sc.copy_patient_and_study_information(header)
    restore_source_text(sc, header)
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    copy_laterality(sc, header)
    sc.BurnedInAnnotation = "YES"
    # Copied, never asserted: whether a face could be recognised is the source's to say.
    if header.get("RecognizableVisualFeatures") in ("YES", "NO"):
        sc.RecognizableVisualFeatures = header.RecognizableVisualFeatures
    elif "RecognizableVisualFeatures" in sc:
        del sc.RecognizableVisualFeatures
    _carry_lossy_compression(sc, header)
    if institution_name:
        sc.InstitutionName = institution_name[:64]
    lines = caption.lines()
    if scored.heatmap is not None:
        lines.append(f"colour bar: {BAR_TITLE}")
    sc.ImageComments = " / ".join(lines)[:10240]
    sc.DerivationDescription = (
        f"{model.heatmap_method} heatmap of {model.name} {model.version} over the source "
        "radiograph"
    )[:1024]
    derivation = Dataset()
    derivation.CodeValue = codes.DCM.ImageProcessing.value
    derivation.CodingSchemeDesignator = "DCM"
    derivation.CodeMeaning = codes.DCM.ImageProcessing.meaning
    sc.DerivationCodeSequence = [derivation]
    source_item = Dataset()
    source_item.ReferencedSOPClassUID = header.SOPClassUID
    source_item.ReferencedSOPInstanceUID = source_uid
    sc.SourceImageSequence = [source_item]
    log.info("built heatmap SC %s for source %s of study %s, model %s",
             sc.SOPInstanceUID, source_uid, study_uid, model.version)
    return sc


__all__ = ["SC_SERIES_DESCRIPTION", "build_heatmap_sc"]
