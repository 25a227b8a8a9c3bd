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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
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
from dicom_node.results import (
    AnalysisResult,
    Finding,
    FindingConcept,
    OutputModel,
    PredecessorRef,
)

log = logging.getLogger(__name__)

# Changes whenever this module changes what it writes, so new content gets new UIDs.
_BUILD = "sr-2"

COVID19 = Code("840539006", "SCT", "COVID-19")
COVID19_CONCEPT = FindingConcept("840539006", "SCT", "COVID-19")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PNEUMONIA_CONCEPT = FindingConcept("233604007", "SCT", "Pneumonia")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
PROBABILITY = Code("122157", "DCM", "Probability")
OPERATING_POINT = Code("111071", "DCM", "CAD Operating Point")
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
CHEST_XRAY = Code("36554-4", "LN", "XR Chest Single view")
CHEST_TWO_VIEWS = Code("36687-2", "LN", "XR Chest 2 Views")
CHEST_PLAIN = Code("399208008", "SCT", "Plain chest X-ray")
IMAGING = Code("363679005", "SCT", "Imaging")
LUNG = Code("39607008", "SCT", "Lung")
COMMENT = Code("121106", "DCM", "Comment")
_MODALITY_CONCEPT = "121139"
_MODALITY_MEANINGS = {
    "CR": "Computed Radiography", "DX": "Digital Radiography", "MG": "Mammography",
    "RG": "Radiographic imaging", "OT": "Other", "CT": "Computed Tomography",
    "MR": "Magnetic Resonance", "US": "Ultrasound", "XA": "X-Ray Angiography",
    "RF": "Radio Fluoroscopy", "PX": "Panoramic X-Ray", "IO": "Intra-oral Radiography",
}

SR_SERIES_DESCRIPTION = "AI RESULT - NOT FOR DIAGNOSTIC USE"
NOT_ANALYSED_SERIES_DESCRIPTION = "AI NOT ANALYSED - NOT FOR DIAGNOSTIC USE"
STUDY_GROUP_ID = "COVID-19 study classification"
IMAGE_GROUP_ID = "COVID-19 image classification"
NOT_ANALYSED_GROUP_ID = "Not analysed"


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
    hotspots: dict[str, tuple[float, float]] = field(default_factory=dict)
    pneumonia_present: bool | None = None
    pneumonia_probability: float | None = None
    pneumonia_threshold: float | None = None


def _device_observer(model: OutputModel) -> hd.sr.ObservationContext:
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


def _algorithm(model: OutputModel) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model.name[:64],
        version=model.version[:64],
        parameters=[
            f"threshold={model.threshold:.6g}",
            f"heatmap_method={model.heatmap_method}",
            f"architecture={model.architecture}",
        ],
    )


def contributing_equipment(model: OutputModel) -> hd.ContributingEquipment:
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


def _code(concept: FindingConcept) -> Code:
    return Code(concept.value, concept.scheme, concept.meaning)


def _evaluation_first(group: Dataset) -> None:
    """Put the present/absent evaluation before the numbers, so a reader meets the call
    first (dsrdump, viewers that render the tree in order)."""
    items = list(group.ContentSequence)
    evaluations = [i for i in items if i.ValueType == "CODE"
                   and i.ConceptNameCodeSequence[0].CodeValue not in ("121071", "363698007")
                   and i.RelationshipType == "CONTAINS"]
    first_num = next((n for n, i in enumerate(items) if i.ValueType == "NUM"), None)
    if not evaluations or first_num is None:
        return
    rest = [i for i in items if not any(i is e for e in evaluations)]
    first_num = next(n for n, i in enumerate(rest) if i.ValueType == "NUM")
    group.ContentSequence = rest[:first_num] + evaluations + rest[first_num:]


def _study_group(tracking_uid: str, finding: Finding, model: OutputModel,
                 headers: Sequence[Dataset]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group of one study-level finding: call, probability, threshold."""
    concept = _code(finding.concept)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"{finding.concept.meaning} study classification"),
        finding_type=concept,
        algorithm_id=_algorithm(model),
        finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG)],
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=float(finding.probability),
                              unit=PROBABILITY_UNIT),
            hd.sr.Measurement(name=OPERATING_POINT, value=float(finding.threshold),
                              unit=PROBABILITY_UNIT),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=concept, value=PRESENT if finding.call else ABSENT)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(h.SOPClassUID, h.SOPInstanceUID)
            for h in headers
        ],
    )
    _evaluation_first(group[0])
    return group


def hotspot(heatmap: np.ndarray | None) -> tuple[float, float] | None:
    """The heatmap's hottest pixel as SCOORD (column, row) pixel-matrix coordinates of
    its centre (PS3.3 C.18.6.1.1: the top left pixel's centre is 0.5\\0.5)."""
    if heatmap is None or heatmap.ndim != 2 or heatmap.size == 0 \
            or not np.isfinite(heatmap).any():
        return None
    row, col = np.unravel_index(int(np.nanargmax(heatmap)), heatmap.shape)
    return float(col) + 0.5, float(row) + 0.5


def _image_group(
    tracking_uid: str, number: int, model: OutputModel, probability: float,
    header: Dataset, point: tuple[float, float] | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations | \
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """One scored image: its probability and, where known, its hotspot on the image."""
    tracking = hd.sr.TrackingIdentifier(uid=tracking_uid,
                                        identifier=f"{IMAGE_GROUP_ID} {number}")
    measurements = [hd.sr.Measurement(name=PROBABILITY, value=float(probability),
                                      unit=PROBABILITY_UNIT)]
    sites = [hd.sr.FindingSite(anatomic_location=LUNG)]
    if point is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=COVID19,
            algorithm_id=_algorithm(model), finding_sites=sites, measurements=measurements,
            source_images=[hd.sr.SourceImageForMeasurementGroup(header.SOPClassUID,
                                                                header.SOPInstanceUID)],
        )
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([point], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(header.SOPClassUID, header.SOPInstanceUID),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_region=region, finding_type=COVID19,
        algorithm_id=_algorithm(model), finding_sites=sites, measurements=measurements,
    )


def _procedure_reported(headers: Sequence[Dataset], scored_views: int) -> list[Code]:
    """The source's Procedure Code Sequence where it has one, else what was scored."""
    codes_found: list[Code] = []
    for h in headers:
        for item in h.get("ProcedureCodeSequence", []):
            try:
                code = Code(str(item.CodeValue), str(item.CodingSchemeDesignator),
                            str(item.CodeMeaning)[:64])
            except AttributeError:
                continue
            if code not in codes_found:
                codes_found.append(code)
    if codes_found:
        return codes_found
    if scored_views == 1:
        return [CHEST_XRAY]
    if scored_views == 2:
        return [CHEST_TWO_VIEWS]
    if scored_views > 2:
        return [CHEST_PLAIN]
    chest = any(str(h.get("BodyPartExamined", "")).upper() == "CHEST" for h in headers)
    return [CHEST_PLAIN if chest else IMAGING]


def _walk(items: Sequence[Dataset], path: str) -> Iterator[tuple[str, Dataset]]:
    for n, item in enumerate(items, start=1):
        here = f"{path}.{n}"
        yield here, item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence, here)


def _finish_content(sr: Dataset, sop_uid: str, headers: Sequence[Dataset]) -> None:
    """Observation UIDs on every content item; the image library's modality from the
    sources' own Modality."""
    sr.ObservationUID = identity.uid_from("observation", sop_uid, "1")
    modality = {str(h.SOPInstanceUID): str(h.get("Modality") or "") for h in headers}
    for path, item in _walk(sr.ContentSequence, "1"):
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
        observation_context=_device_observer(model),
        procedure_reported=list(procedure),
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
        _study_group(identity.uid_from("tracking", sop_uid, "study", f.concept.scheme,
                                       f.concept.value), f, result.model, headers)
        for f in findings
    ]
    groups.extend(
        _image_group(identity.uid_from("tracking", sop_uid, str(h.SOPInstanceUID)), n,
                     result.model, s.probability, h, point)
        for n, (s, h, point) in enumerate(zip(result.scored, headers, points, strict=True),
                                          start=1)
    )
    sr = _document(identity.SR, sop_uid, headers, result.model, groups, result.predecessor,
                   institution_name, SR_SERIES_DESCRIPTION,
                   _procedure_reported(headers, len(headers)))
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
        algorithm_id=_algorithm(model),
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=COMMENT, value=f"Not analysed: {reason}"[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    ))
    sr = _document(identity.NOT_ANALYSED_SR, sop_uid, headers, model, [group], predecessor,
                   institution_name, NOT_ANALYSED_SERIES_DESCRIPTION,
                   _procedure_reported(headers, 0))
    log.info("built not-analysed SR %s for study %s", sr.SOPInstanceUID, sr.StudyInstanceUID)
    return sr


# ------------------------------------------------------------------------- reading back
_MEASUREMENT_GROUP = "125007"
_TRACKING_ID = "112039"
_FINDING = "121071"
_ALGORITHM_NAME = "111001"
_ALGORITHM_VERSION = "111003"


def _concept(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def _image_ref(item: Dataset) -> str | None:
    seq = item.get("ReferencedSOPSequence")
    return str(seq[0].ReferencedSOPInstanceUID) if seq else None


@dataclass
class _Group:
    tracking: str = ""
    finding: str | None = None
    evaluation: str | None = None
    numbers: dict[str, float] | None = None
    images: list[str] | None = None
    point: tuple[float, float] | None = None
    comment: str | None = None
    algorithm: tuple[str | None, str | None] = (None, None)


def _read_group(container: Dataset) -> _Group:
    g = _Group(numbers={}, images=[])
    name = version = None
    for item in container.get("ContentSequence", []):
        concept, vt = _concept(item), item.ValueType
        if vt == "TEXT" and concept == _TRACKING_ID:
            g.tracking = str(item.TextValue)
        elif vt == "CODE" and concept == _FINDING:
            g.finding = str(item.ConceptCodeSequence[0].CodeValue)
        elif vt == "CODE" and g.finding is not None and concept == g.finding:
            g.evaluation = str(item.ConceptCodeSequence[0].CodeValue)
        elif vt == "NUM":
            value = item.MeasuredValueSequence[0].NumericValue
            g.numbers[concept] = float(value)  # type: ignore[index]
        elif vt == "TEXT" and concept == COMMENT.value:
            g.comment = str(item.TextValue)
        elif vt == "TEXT" and concept == _ALGORITHM_NAME:
            name = str(item.TextValue)
        elif vt == "TEXT" and concept == _ALGORITHM_VERSION:
            version = str(item.TextValue)
        elif vt == "IMAGE":
            ref = _image_ref(item)
            if ref:
                g.images.append(ref)  # type: ignore[union-attr]
        elif vt == "SCOORD":
            data = [float(v) for v in item.GraphicData]
            g.point = (data[0], data[1])
            for sub in item.get("ContentSequence", []):
                ref = _image_ref(sub)
                if ref:
                    g.images.append(ref)  # type: ignore[union-attr]
    g.algorithm = (name, version)
    return g


@dataclass(frozen=True)
class FindingReadback:
    """One study-level finding as read back from an SR."""

    code: str
    present: bool | None
    probability: float | None
    threshold: float | None


def read_findings(ds: Dataset) -> list[FindingReadback]:
    """Every study-level finding of one of our SRs, in document order."""
    out = []
    for path_item in _walk(ds.get("ContentSequence", []), "1"):
        item = path_item[1]
        if item.ValueType == "CONTAINER" and _concept(item) == _MEASUREMENT_GROUP:
            g = _read_group(item)
            if g.finding and g.evaluation is not None:
                out.append(FindingReadback(
                    g.finding, g.evaluation == PRESENT.value,
                    (g.numbers or {}).get(PROBABILITY.value),
                    (g.numbers or {}).get(OPERATING_POINT.value)))
    return out


def read_result(ds: Dataset) -> SrReadback:
    """Read the finding, probability and threshold back from one of our SRs, in any of
    the classes it may have been sent in (the content tree is read as it is)."""
    if str(ds.get("SOPClassUID", "")) not in (pydicom.uid.Comprehensive3DSRStorage,
                                               pydicom.uid.ComprehensiveSRStorage,
                                               pydicom.uid.EnhancedSRStorage):
        raise ValueError(f"not one of our SR classes: {ds.get('SOPClassUID')}")
    groups = [_read_group(item) for _p, item in _walk(ds.get("ContentSequence", []), "1")
              if item.ValueType == "CONTAINER" and _concept(item) == _MEASUREMENT_GROUP]
    study = next((g for g in groups if g.finding == COVID19.value
                  and not g.tracking.startswith(IMAGE_GROUP_ID)), None)
    reason = next((g.comment.removeprefix("Not analysed: ") for g in groups
                   if g.comment is not None), None)
    present: bool | None = None
    probability = threshold = None
    if study is not None and study.evaluation is not None:
        present = study.evaluation == PRESENT.value
    if study is not None:
        probability = (study.numbers or {}).get(PROBABILITY.value)
        threshold = (study.numbers or {}).get(OPERATING_POINT.value)
    per_image: dict[str, float] = {}
    hotspots: dict[str, tuple[float, float]] = {}
    for g in groups:
        if g.tracking.startswith(IMAGE_GROUP_ID) and g.images:
            value = (g.numbers or {}).get(PROBABILITY.value)
            if value is not None:
                per_image[g.images[0]] = value
            if g.point is not None:
                hotspots[g.images[0]] = g.point
    name, version = next((g.algorithm for g in groups if g.algorithm != (None, None)),
                         (None, None))
    pneumonia = next((g for g in groups if g.finding == PNEUMONIA.value
                      and not g.tracking.startswith(IMAGE_GROUP_ID)), None)
    p_present: bool | None = None
    p_prob = p_thr = None
    if pneumonia is not None:
        if pneumonia.evaluation is not None:
            p_present = pneumonia.evaluation == PRESENT.value
        p_prob = (pneumonia.numbers or {}).get(PROBABILITY.value)
        p_thr = (pneumonia.numbers or {}).get(OPERATING_POINT.value)
    return SrReadback(present, probability, threshold, per_image, name, version, reason,
                      hotspots, p_present, p_prob, p_thr)


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
