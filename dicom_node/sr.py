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
- second finding of three-class models: SNOMED CT 233604007 "Pneumonia", the
  pneumonia pattern P(covid) + P(other pneumonia), in its own study-level group with
  its own operating point and present/absent evaluation;
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
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node import identity
from dicom_node.conformance import no_person_name_warnings, sanitise_source
from dicom_node.results import AnalysisResult, ModelInfo, PredecessorRef

log = logging.getLogger(__name__)

COVID19 = Code("840539006", "SCT", "COVID-19")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
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
PNEUMONIA_GROUP_ID = "Pneumonia study classification"


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
    pneumonia_present: bool | None = None
    pneumonia_probability: float | None = None
    pneumonia_threshold: float | None = None


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
    finding: Code = COVID19,
    threshold: float | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group: probability, and where ``call`` is given the threshold and the
    present/absent evaluation (``threshold`` defaults to the COVID-19 one)."""
    measurements = [
        hd.sr.Measurement(
            name=PROBABILITY, value=float(probability), unit=PROBABILITY_UNIT,
        ),
    ]
    evaluations = []
    if call is not None:
        measurements.append(
            hd.sr.Measurement(name=OPERATING_POINT,
                              value=float(model.threshold if threshold is None else threshold),
                              unit=PROBABILITY_UNIT)
        )
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=finding, value=PRESENT if call else ABSENT,
        ))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=label),
        finding_type=finding,
        algorithm_id=_algorithm(model),
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(h.SOPClassUID, h.SOPInstanceUID)
            for h in headers
        ],
    )


def _document(
    kind: str,
    headers: Sequence[Dataset],
    model: ModelInfo,
    groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations],
    predecessor: PredecessorRef | None,
    institution_name: str | None,
    series_description: str,
) -> hd.sr.Comprehensive3DSR:
    source_uids = [str(h.SOPInstanceUID) for h in headers]
    study_uid = str(headers[0].StudyInstanceUID)
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
            sop_instance_uid=identity.instance_uid(kind, source_uids, model.version,
                                                   model.sha256),
            instance_number=1,
            manufacturer=model.manufacturer[:64],
            is_complete=True,
            institution_name=institution_name or None,
            previous_versions=[_predecessor_dataset(predecessor)] if predecessor else None,
            contributing_equipment=[contributing_equipment(model)],
        )
    sr.SeriesDescription = series_description
    return sr


def build_sr(result: AnalysisResult, institution_name: str | None = None) -> Dataset:
    """The SR of an analysed study: the call, its probability and every scored image."""
    if not result.scored:
        raise ValueError("an analysed result needs at least one scored image")
    headers = [sanitise_source(s.source) for s in result.scored]
    sop_uid = identity.instance_uid(
        identity.SR, [str(h.SOPInstanceUID) for h in headers],
        result.model.version, result.model.sha256,
    )
    groups = [
        _classification_group(
            identity.uid_from("tracking", sop_uid, "study"), STUDY_GROUP_ID, result.model,
            result.study_probability, headers, call=result.positive,
        )
    ]
    if result.pneumonia_probability is not None and result.model.pneumonia_threshold is not None:
        groups.append(_classification_group(
            identity.uid_from("tracking", sop_uid, "study-pneumonia"), PNEUMONIA_GROUP_ID,
            result.model, result.pneumonia_probability, headers,
            call=bool(result.pneumonia_positive), finding=PNEUMONIA,
            threshold=result.model.pneumonia_threshold,
        ))
    if len(headers) > 1:
        groups.extend(
            _classification_group(
                identity.uid_from("tracking", sop_uid, str(h.SOPInstanceUID)),
                IMAGE_GROUP_ID, result.model, s.probability, [h], call=None,
            )
            for s, h in zip(result.scored, headers, strict=True)
        )
    sr = _document(identity.SR, headers, result.model, groups, result.predecessor,
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
    sop_uid = identity.instance_uid(
        identity.NOT_ANALYSED_SR, [str(h.SOPInstanceUID) for h in headers],
        model.version, model.sha256,
    )
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
    sr = _document(identity.NOT_ANALYSED_SR, headers, model, [group], predecessor,
                   institution_name, NOT_ANALYSED_SERIES_DESCRIPTION)
    log.info("built not-analysed SR %s for study %s", sr.SOPInstanceUID, sr.StudyInstanceUID)
    return sr


def _num(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: Code) -> float | None:
    found = group.get_measurements(name=name)
    return float(found[0].value) if found else None


def read_result(ds: Dataset) -> SrReadback:
    """Read the finding, probability and threshold back from one of our SRs."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    content: hd.sr.MeasurementReport = sr.content  # type: ignore[assignment]
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
    pneumonia = content.get_image_measurement_groups(finding_type=PNEUMONIA)
    p_present: bool | None = None
    p_prob = p_thr = None
    if pneumonia:
        p_eval = pneumonia[0].get_qualitative_evaluations(name=PNEUMONIA)
        if p_eval:
            p_present = p_eval[0].value == PRESENT
        p_prob = _num(pneumonia[0], PROBABILITY)
        p_thr = _num(pneumonia[0], OPERATING_POINT)
    return SrReadback(present, probability, threshold, per_image, name, version, reason,
                      p_present, p_prob, p_thr)


__all__ = [
    "COVID19",
    "PNEUMONIA",
    "SrReadback",
    "build_not_analysed_sr",
    "build_sr",
    "contributing_equipment",
    "read_result",
]
