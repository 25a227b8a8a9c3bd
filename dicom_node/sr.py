"""The Structured Report we send back to the PACS: a TID 1500 Measurement Report.

It follows the IHE AI Results (AIR) profile's pattern: a device observer that names the
model, an image library of every scored source image (its modality the source's own),
and measurement groups (TID 1501/1410), each with its own tracking identifier and UID:

- one study-level group per finding (a list, :class:`dicom_node.results.Finding`):
  the present/absent evaluation first, then the probability and the operating point,
  with Finding Site lung and every scored image as its source;
- one group per scored image with that image's probability and, where a heatmap was
  computed, its hotspot as an SCOORD POINT on the source image (TID 1410);
- a not-analysed report carries no finding at all, only the reason as a comment.

Every content item carries an Observation UID derived from the document's UID and its
place in the tree.  Procedure Reported is the source's Procedure Code Sequence where
present, otherwise what was scored (one chest view, two, or more).

Codes used (each from a published terminology):
- finding: SNOMED CT 840539006 "Disease caused by severe acute respiratory syndrome
  coronavirus 2" (code meaning shortened to its SNOMED synonym "COVID-19", since Code
  Meaning is LO, at most 64 characters);
- present / absent: SNOMED CT 52101004 "Present" / 272519000 "Absent" (CID 240/241);
- probability: DCM 122157 "Probability", unit UCUM "{probability}" (dimensionless);
- operating threshold: DCM 111071 "CAD Operating Point";
- finding site: SNOMED CT 39607008 "Lung";
- procedure reported: LOINC 36554-4 "XR Chest Single view", LOINC 36687-2 "XR Chest 2
  Views", SNOMED CT 399208008 "Plain chest X-ray" (three or more views), SNOMED CT
  363679005 "Imaging" (nothing scored and no chest named).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node import identity
from dicom_node.conformance import (
    build_charset,
    no_person_name_warnings,
    restore_source_text,
    sanitise_source,
)
from dicom_node.results import AnalysisResult, Finding, OutputModel, PredecessorRef
from dicom_node.sr_content import (
    COMMENT,
    COVID19,
    COVID19_CONCEPT,
    NOT_ANALYSED_GROUP_ID,
    NOT_ANALYSED_SERIES_DESCRIPTION,
    PNEUMONIA,
    PNEUMONIA_CONCEPT,
    SR_SERIES_DESCRIPTION,
    algorithm_id,
    contributing_equipment,
    device_observer,
    hotspot,
    image_group,
    library_view,
    predecessor_dataset,
    procedure_reported,
    study_group,
    walk_content,
)
from dicom_node.sr_read import FindingReadback, SrReadback, read_findings, read_result

log = logging.getLogger(__name__)

# Changes whenever this module changes what it writes, so new content gets new UIDs.
_BUILD = "sr-2"

_MODALITY_CONCEPT = "121139"
_MODALITY_MEANINGS = {
    "CR": "Computed Radiography", "DX": "Digital Radiography", "MG": "Mammography",
    "RG": "Radiographic imaging", "OT": "Other", "CT": "Computed Tomography",
    "MR": "Magnetic Resonance", "US": "Ultrasound", "XA": "X-Ray Angiography",
    "RF": "Radio Fluoroscopy", "PX": "Panoramic X-Ray", "IO": "Intra-oral Radiography",
}


def _finish_content(sr: Dataset, sop_uid: str, headers: Sequence[Dataset]) -> None:
    """Observation UIDs on every content item; the image library's modality from the
    sources' own Modality."""
    sr.ObservationUID = identity.uid_from("observation", sop_uid, "1")
    modality = {str(h.SOPInstanceUID): str(h.get("Modality") or "") for h in headers}
    for path, item in walk_content(sr.ContentSequence, "1"):
        item.ObservationUID = identity.uid_from("observation", sop_uid, path)
        if item.ValueType == "IMAGE" and "ContentSequence" in item:
            ref = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            value = modality.get(str(ref), "")
            if not value:
                continue
            for sub in item.ContentSequence:
                if sub.ValueType == "CODE" and \
                        sub.ConceptNameCodeSequence[0].CodeValue == _MODALITY_CONCEPT:
                    code = sub.ConceptCodeSequence[0]
                    code.CodeValue = value
                    code.CodingSchemeDesignator = "DCM"
                    code.CodeMeaning = _MODALITY_MEANINGS.get(value, value)


def _content_uid(kind: str, headers: Sequence[Dataset], model: OutputModel,
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
    model: OutputModel,
    groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations
                     | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations],
    predecessor: PredecessorRef | None,
    institution_name: str | None,
    series_description: str,
    procedure: Sequence[Code],
) -> hd.sr.Comprehensive3DSR:
    study_uid = str(headers[0].StudyInstanceUID)
    if predecessor is not None and predecessor.sop_instance_uid == sop_uid:
        # Never name ourselves: the same UID means the same content, not a new version.
        log.warning("SR %s: predecessor is the object itself; not referenced", sop_uid)
        predecessor = None
    report = hd.sr.MeasurementReport(
        observation_context=device_observer(model),
        procedure_reported=list(procedure),
        imaging_measurements=list(groups) or None,
        referenced_images=[library_view(h) for h in headers],
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
            previous_versions=[predecessor_dataset(predecessor)] if predecessor else None,
            contributing_equipment=[contributing_equipment(model)],
            transfer_syntax_uid=ExplicitVRLittleEndian,
            specific_character_set=build_charset(headers[0]),
        )
    restore_source_text(sr, headers[0])
    sr.SeriesDescription = series_description
    # General Equipment: the model is the device that made this object.
    sr.ManufacturerModelName = model.name[:64]
    sr.SoftwareVersions = model.version[:64]
    _finish_content(sr, sop_uid, headers)
    return sr


def _findings(result: AnalysisResult) -> list[Finding]:
    """The study-level findings of a result: COVID-19 first, then any others."""
    covid = Finding(COVID19_CONCEPT, float(result.study_probability),
                    float(result.model.threshold), bool(result.positive))
    found = [covid]
    if (result.pneumonia_probability is not None
            and result.model.pneumonia_threshold is not None):
        # The pneumonia-pattern finding of a three-class model: P(covid) + P(other pneumonia).
        found.append(Finding(PNEUMONIA_CONCEPT, float(result.pneumonia_probability),
                             float(result.model.pneumonia_threshold),
                             bool(result.pneumonia_positive)))
    return [*found, *result.extra_findings]


def build_sr(result: AnalysisResult, institution_name: str | None = None) -> Dataset:
    """The SR of an analysed study: each finding's call, its probability and every
    scored image with its own probability and hotspot."""
    if not result.scored:
        raise ValueError("an analysed result needs at least one scored image")
    headers = [sanitise_source(s.source) for s in result.scored]
    findings = _findings(result)
    points = [hotspot(s.heatmap) for s in result.scored]
    sop_uid = _content_uid(
        identity.SR, headers, result.model, result.predecessor, institution_name,
        SR_SERIES_DESCRIPTION,
        [[f.concept.value, f.concept.scheme, f.concept.meaning, f.probability, f.threshold,
          f.call] for f in findings],
        [s.probability for s in result.scored], [list(p) if p else None for p in points],
    )
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations
                 | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = [
        study_group(identity.uid_from("tracking", sop_uid, "study", f.concept.scheme,
                                       f.concept.value), f, result.model, headers)
        for f in findings
    ]
    groups.extend(
        image_group(identity.uid_from("tracking", sop_uid, str(h.SOPInstanceUID)), n,
                     result.model, s.probability, h, point)
        for n, (s, h, point) in enumerate(zip(result.scored, headers, points, strict=True),
                                          start=1)
    )
    sr = _document(identity.SR, sop_uid, headers, result.model, groups, result.predecessor,
                   institution_name, SR_SERIES_DESCRIPTION,
                   procedure_reported(headers, len(headers)))
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
    model: OutputModel,
    predecessor: PredecessorRef | None = None,
    institution_name: str | None = None,
) -> Dataset:
    """An SR stating that the study was not analysed, and why.

    Only sent where the operator asks for it (``Settings.not_analysed_report``); the
    worker decides. It carries no finding, no probability and no call: only the reason
    as a comment in a group without a finding.
    """
    if not sources:
        raise ValueError("a not-analysed report needs at least one source instance")
    headers = [sanitise_source(s) for s in sources]
    sop_uid = _content_uid(identity.NOT_ANALYSED_SR, headers, model, predecessor,
                           institution_name, NOT_ANALYSED_SERIES_DESCRIPTION, reason)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=identity.uid_from("tracking", sop_uid, "not-analysed"),
            identifier=NOT_ANALYSED_GROUP_ID,
        ),
        algorithm_id=algorithm_id(model),
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=COMMENT, value=f"Not analysed: {reason}"[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    ))
    sr = _document(identity.NOT_ANALYSED_SR, sop_uid, headers, model, [group], predecessor,
                   institution_name, NOT_ANALYSED_SERIES_DESCRIPTION,
                   procedure_reported(headers, 0))
    log.info("built not-analysed SR %s for study %s", sr.SOPInstanceUID, sr.StudyInstanceUID)
    return sr


__all__ = [
    "COVID19",
    "COVID19_CONCEPT",
    "FindingReadback",
    "PNEUMONIA",
    "PNEUMONIA_CONCEPT",
    "SrReadback",
    "build_not_analysed_sr",
    "build_sr",
    "contributing_equipment",
    "hotspot",
    "read_findings",
    "read_result",
]
