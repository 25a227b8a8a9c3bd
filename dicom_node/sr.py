"""The Structured Report we send back to the PACS: a TID 1500 Measurement Report.

It follows the IHE AI Results (AIR) profile's pattern: a device observer that names the
model, an image library of every scored source image, and measurement groups (TID 1501)
whose finding is COVID-19, with a present/absent evaluation at the model's operating
point and the probability behind it. The study-level group comes first and carries the
call; one further group per scored image carries that image's probability.

Codes used (each from a published terminology):
- finding: SNOMED CT 840539006 "Disease caused by severe acute respiratory syndrome
  coronavirus 2" (code meaning shortened to its SNOMED synonym "COVID-19", since Code
  Meaning is LO, at most 64 characters);
- present / absent: SNOMED CT 52101004 "Present" / 272519000 "Absent" (CID 240/241);
- probability: DCM 122157 "Probability", unit UCUM "{probability}" (dimensionless);
- operating threshold: DCM 111071 "CAD Operating Point";
- procedure reported: LOINC 36554-4 "XR Chest Single view" (the frontal radiograph we
  score; as used e.g. by IHE RAD Imaging Diagnostic Report examples).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node import identity
from dicom_node.conformance import (
    build_charset,
    no_person_name_warnings,
    restore_source_text,
    sanitise_source,
)
from dicom_node.results import AnalysisResult, ModelInfo, PredecessorRef

log = logging.getLogger(__name__)

# Changes whenever this module changes what it writes, so new content gets new UIDs.
_BUILD = "sr-2"

COVID19 = Code("840539006", "SCT", "COVID-19")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
PROBABILITY = Code("122157", "DCM", "Probability")
OPERATING_POINT = Code("111071", "DCM", "CAD Operating Point")
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
CHEST_XRAY = Code("36554-4", "LN", "XR Chest Single view")
COMMENT = Code("121106", "DCM", "Comment")

SR_SERIES_DESCRIPTION = "AI RESULT - NOT FOR DIAGNOSTIC USE"
NOT_ANALYSED_SERIES_DESCRIPTION = "AI NOT ANALYSED - NOT FOR DIAGNOSTIC USE"
STUDY_GROUP_ID = "COVID-19 study classification"
IMAGE_GROUP_ID = "COVID-19 image classification"


@dataclass(frozen=True)
class SrReadback:
    """What a reader needs from one of our SRs; built by :func:`read_result`."""

    finding_present: bool | None
    probability: float | None
    threshold: float | None
    image_probabilities: dict[str, float]
    algorithm_name: str | None
    algorithm_version: str | None
    not_analysed_reason: str | None


def _device_observer(model: ModelInfo) -> hd.sr.ObservationContext:
    attrs = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=identity.device_uid(model.version, model.sha256),
        name=model.name[:64],
        manufacturer_name=model.manufacturer[:64],
        model_name=model.version[:64],
        serial_number=model.sha256[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=attrs,
        )
    )


def _algorithm(model: ModelInfo) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model.name[:64],
        version=model.version[:64],
        parameters=[
            f"threshold={model.threshold:.6g}",
            f"heatmap_method={model.heatmap_method}",
            f"architecture={model.architecture}",
        ],
    )


def contributing_equipment(model: ModelInfo) -> hd.ContributingEquipment:
    """The model as Contributing Equipment: name, version and weights hash (MONAI Deploy)."""
    return hd.ContributingEquipment(
        manufacturer=model.manufacturer[:64],
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name[:64],
        # The weights hash is the serial number (exactly 64 characters) and is repeated in
        # the description.  Beside the version in SoftwareVersions it would make an odd
        # total length whose padding byte lands on a 64-character value.
        software_versions=[model.version[:64]],
        device_serial_number=model.sha256[:64],
        contribution_description=(
            f"COVID-19 triage model {model.name} {model.version} "
            f"({model.architecture}), weights sha256 {model.sha256}"
        )[:1024],
    )


def _library_view(header: Dataset) -> Dataset:
    """The attributes highdicom's image library reads, from a sanitised header.

    For CR/DX it describes orientation and imager spacing (TID 1603); sources often lack
    them, and then the entry falls back to the modality-independent descriptors.
    """
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "Modality",
                    "FrameOfReferenceUID", "PatientOrientation", "ImagerPixelSpacing"):
        if keyword in header and header[keyword].value not in (None, ""):
            setattr(view, keyword, header[keyword].value)
    orientation = view.get("PatientOrientation")
    has_projection = (
        orientation is not None and len(orientation) == 2
        and len(view.get("ImagerPixelSpacing") or []) == 2
    )
    if not has_projection:
        view.Modality = "OT"  # only steers the descriptor choice; the coded modality
        # in the library comes from the SOP Class
    return view


def _predecessor_dataset(ref: PredecessorRef) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = ref.study_instance_uid
    ds.SeriesInstanceUID = ref.series_instance_uid
    ds.SOPClassUID = ref.sop_class_uid
    ds.SOPInstanceUID = ref.sop_instance_uid
    return ds


def _classification_group(
    tracking_uid: str,
    label: str,
    model: ModelInfo,
    probability: float,
    headers: Sequence[Dataset],
    call: bool | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group: probability, and where ``call`` is given the threshold and the
    present/absent evaluation."""
    measurements = [
        hd.sr.Measurement(
            name=PROBABILITY, value=float(probability), unit=PROBABILITY_UNIT,
        ),
    ]
    evaluations = []
    if call is not None:
        measurements.append(
            hd.sr.Measurement(name=OPERATING_POINT, value=float(model.threshold),
                              unit=PROBABILITY_UNIT)
        )
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=COVID19, value=PRESENT if call else ABSENT,
        ))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=label),
        finding_type=COVID19,
        algorithm_id=_algorithm(model),
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(h.SOPClassUID, h.SOPInstanceUID)
            for h in headers
        ],
    )


def _content_uid(kind: str, headers: Sequence[Dataset], model: ModelInfo,
                 predecessor: PredecessorRef | None, institution_name: str | None,
                 *content: object) -> str:
    """The SOP Instance UID of an SR: a digest of everything that shapes its content."""
    digest = identity.content_digest(
        _BUILD, hd.__version__, pydicom.__version__, kind, list(headers),
        [model.name, model.version, model.sha256, model.architecture, model.threshold,
         model.heatmap_method, model.manufacturer],
        None if predecessor is None else [
            predecessor.study_instance_uid, predecessor.series_instance_uid,
            predecessor.sop_class_uid, predecessor.sop_instance_uid],
        institution_name or None, list(content),
    )
    return identity.instance_uid(kind, [str(h.SOPInstanceUID) for h in headers],
                                 model.version, model.sha256, digest)


def _document(
    kind: str,
    sop_uid: str,
    headers: Sequence[Dataset],
    model: ModelInfo,
    groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations],
    predecessor: PredecessorRef | None,
    institution_name: str | None,
    series_description: str,
) -> hd.sr.Comprehensive3DSR:
    study_uid = str(headers[0].StudyInstanceUID)
    if predecessor is not None and predecessor.sop_instance_uid == sop_uid:
        # Never name ourselves: the same UID means the same content, not a new version.
        log.warning("SR %s: predecessor is the object itself; not referenced", sop_uid)
        predecessor = None
    report = hd.sr.MeasurementReport(
        observation_context=_device_observer(model),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=list(groups) or None,
        referenced_images=[_library_view(h) for h in headers],
    )
    with no_person_name_warnings():
        sr = hd.sr.Comprehensive3DSR(
            evidence=list(headers),
            content=report[0],
            series_instance_uid=identity.series_uid(kind, study_uid, model.version,
                                                    model.sha256),
            series_number=identity.series_number(identity.SR, model.version),
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=model.manufacturer[:64],
            is_complete=True,
            institution_name=institution_name or None,
            previous_versions=[_predecessor_dataset(predecessor)] if predecessor else None,
            contributing_equipment=[contributing_equipment(model)],
            transfer_syntax_uid=ExplicitVRLittleEndian,
            specific_character_set=build_charset(headers[0]),
        )
    restore_source_text(sr, headers[0])
    sr.SeriesDescription = series_description
    return sr


def build_sr(result: AnalysisResult, institution_name: str | None = None) -> Dataset:
    """The SR of an analysed study: the call, its probability and every scored image."""
    if not result.scored:
        raise ValueError("an analysed result needs at least one scored image")
    headers = [sanitise_source(s.source) for s in result.scored]
    sop_uid = _content_uid(
        identity.SR, headers, result.model, result.predecessor, institution_name,
        SR_SERIES_DESCRIPTION, result.study_probability, result.positive,
        [s.probability for s in result.scored],
    )
    groups = [
        _classification_group(
            identity.uid_from("tracking", sop_uid, "study"), STUDY_GROUP_ID, result.model,
            result.study_probability, headers, call=result.positive,
        )
    ]
    if len(headers) > 1:
        groups.extend(
            _classification_group(
                identity.uid_from("tracking", sop_uid, str(h.SOPInstanceUID)),
                IMAGE_GROUP_ID, result.model, s.probability, [h], call=None,
            )
            for s, h in zip(result.scored, headers, strict=True)
        )
    sr = _document(identity.SR, sop_uid, headers, result.model, groups, result.predecessor,
                   institution_name, SR_SERIES_DESCRIPTION)
    # The worker's call is authoritative; a disagreement with the threshold is worth a line.
    if result.positive != (result.study_probability >= result.model.threshold):
        log.warning("study %s: call and probability disagree at threshold %s",
                    sr.StudyInstanceUID, result.model.threshold)
    log.info("built SR %s for study %s from %d image(s), model %s",
             sr.SOPInstanceUID, sr.StudyInstanceUID, len(headers), result.model.version)
    return sr


def build_not_analysed_sr(
    sources: Sequence[Dataset],
    reason: str,
    model: ModelInfo,
    predecessor: PredecessorRef | None = None,
    institution_name: str | None = None,
) -> Dataset:
    """An SR stating that the study was not analysed, and why.

    Only sent where the operator asks for it (``Settings.not_analysed_report``); the
    worker decides. It carries no probability and no call, only the reason as a comment.
    """
    if not sources:
        raise ValueError("a not-analysed report needs at least one source instance")
    headers = [sanitise_source(s) for s in sources]
    sop_uid = _content_uid(identity.NOT_ANALYSED_SR, headers, model, predecessor,
                           institution_name, NOT_ANALYSED_SERIES_DESCRIPTION, reason)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=identity.uid_from("tracking", sop_uid, "not-analysed"),
            identifier="COVID-19 not analysed",
        ),
        finding_type=COVID19,
        algorithm_id=_algorithm(model),
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=COMMENT, value=f"Not analysed: {reason}"[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    ))
    sr = _document(identity.NOT_ANALYSED_SR, sop_uid, headers, model, [group], predecessor,
                   institution_name, NOT_ANALYSED_SERIES_DESCRIPTION)
    log.info("built not-analysed SR %s for study %s", sr.SOPInstanceUID, sr.StudyInstanceUID)
    return sr


def _num(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: Code) -> float | None:
    found = group.get_measurements(name=name)
    return float(found[0].value) if found else None


def read_result(ds: Dataset) -> SrReadback:
    """Read the finding, probability and threshold back from one of our SRs, in any of
    the classes it may have been sent in."""
    readers: dict[str, type[hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR
                             | hd.sr.EnhancedSR]] = {
        pydicom.uid.Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
        pydicom.uid.ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
        pydicom.uid.EnhancedSRStorage: hd.sr.EnhancedSR,
    }
    reader = readers.get(str(ds.SOPClassUID))
    if reader is None:
        raise ValueError(f"not one of our SR classes: {ds.SOPClassUID}")
    sr = reader.from_dataset(ds)
    content: hd.sr.MeasurementReport = sr.content
    groups = content.get_image_measurement_groups(finding_type=COVID19)
    study = next((g for g in groups if g.tracking_identifier != IMAGE_GROUP_ID), None)
    present: bool | None = None
    probability = threshold = None
    reason = None
    name = version = None
    if study is not None:
        evaluations = study.get_qualitative_evaluations(name=COVID19)
        if evaluations:
            present = evaluations[0].value == PRESENT
        probability = _num(study, PROBABILITY)
        threshold = _num(study, OPERATING_POINT)
        for item in study[0].ContentSequence:
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == \
                    COMMENT.value:
                reason = str(item.TextValue).removeprefix("Not analysed: ")
            if item.ValueType == "TEXT" and \
                    item.ConceptNameCodeSequence[0].CodeValue == "111001":  # Algorithm Name
                name = str(item.TextValue)
            if item.ValueType == "TEXT" and \
                    item.ConceptNameCodeSequence[0].CodeValue == "111003":  # Algorithm Version
                version = str(item.TextValue)
    per_image: dict[str, float] = {}
    for g in groups:
        if g.tracking_identifier == IMAGE_GROUP_ID and g.source_images:
            value = _num(g, PROBABILITY)
            if value is not None:
                per_image[str(g.source_images[0].referenced_sop_instance_uid)] = value
    return SrReadback(present, probability, threshold, per_image, name, version, reason)


__all__ = [
    "COVID19",
    "SrReadback",
    "build_not_analysed_sr",
    "build_sr",
    "contributing_equipment",
    "read_result",
]
