"""Reading our SRs back: the findings, probabilities, thresholds, per-image values and
hotspots, from the content tree as it is (whatever SR class it was sent in)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pydicom
from pydicom.dataset import Dataset

from dicom_node.sr_content import (
    COMMENT,
    COVID19,
    IMAGE_GROUP_ID,
    OPERATING_POINT,
    PNEUMONIA,
    PRESENT,
    PROBABILITY,
    walk_content,
)


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
    for path_item in walk_content(ds.get("ContentSequence", []), "1"):
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
    groups = [_read_group(item) for _p, item in walk_content(ds.get("ContentSequence", []), "1")
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
