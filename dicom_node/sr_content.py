"""The building blocks of our SR (highdicom's ``content.py`` pattern): the codes it uses,
the device observer and algorithm that name the model, the image library's view of a
source, the study- and image-level measurement groups, and Procedure Reported.

:mod:`dicom_node.sr` assembles them into a document; the codes are described there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node import identity
from dicom_node.results import Finding, FindingConcept, OutputModel, PredecessorRef

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

SR_SERIES_DESCRIPTION = "AI RESULT - NOT FOR DIAGNOSTIC USE"
NOT_ANALYSED_SERIES_DESCRIPTION = "AI NOT ANALYSED - NOT FOR DIAGNOSTIC USE"
STUDY_GROUP_ID = "COVID-19 study classification"
IMAGE_GROUP_ID = "COVID-19 image classification"
NOT_ANALYSED_GROUP_ID = "Not analysed"


def device_observer(model: OutputModel) -> hd.sr.ObservationContext:
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


def algorithm_id(model: OutputModel) -> hd.sr.AlgorithmIdentification:
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


def library_view(header: Dataset) -> Dataset:
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


def predecessor_dataset(ref: PredecessorRef) -> Dataset:
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


def study_group(tracking_uid: str, finding: Finding, model: OutputModel,
                 headers: Sequence[Dataset]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group of one study-level finding: call, probability, threshold."""
    concept = _code(finding.concept)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"{finding.concept.meaning} study classification"),
        finding_type=concept,
        algorithm_id=algorithm_id(model),
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


def image_group(
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
            algorithm_id=algorithm_id(model), finding_sites=sites, measurements=measurements,
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
        algorithm_id=algorithm_id(model), finding_sites=sites, measurements=measurements,
    )


def procedure_reported(headers: Sequence[Dataset], scored_views: int) -> list[Code]:
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


def walk_content(items: Sequence[Dataset], path: str) -> Iterator[tuple[str, Dataset]]:
    for n, item in enumerate(items, start=1):
        here = f"{path}.{n}"
        yield here, item
        if "ContentSequence" in item:
            yield from walk_content(item.ContentSequence, here)
