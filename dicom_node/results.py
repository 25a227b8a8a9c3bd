"""What the worker hands to the result builders, and how built objects reach the disk.

The worker fills these frozen dataclasses from the database and the model; the SR and SC
builders read nothing else, so they stay pure functions of their inputs (and so their UIDs
can be deterministic).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from db import paths
from db.atomic import write_atomically

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputModel:
    """The model that produced a result, as recorded in every output object."""

    name: str
    version: str
    sha256: str
    architecture: str
    threshold: float
    heatmap_method: str
    manufacturer: str = "cxr-triage"
    # the pneumonia-pattern finding's operating point (three-class models only)
    pneumonia_threshold: float | None = None


@dataclass(frozen=True)
class ScoredImage:
    """One scored source image.

    ``source`` holds the source's headers (pixel data may be absent), ``image01`` its decoded
    pixels in [0, 1] and ``heatmap`` the model's map at source resolution, or None where no
    map was computed.
    """

    source: Dataset
    probability: float
    heatmap: np.ndarray | None
    image01: np.ndarray
    pneumonia_probability: float | None = None  # three-class models only


@dataclass(frozen=True)
class PredecessorRef:
    """The SR this one replaces, for the Predecessor Documents Sequence."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class FindingConcept:
    """A coded concept (code value, scheme, meaning) without a pydicom dependency."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Finding:
    """One study-level finding of the SR: its concept, the probability, the threshold the
    call was made at, and the call.  Adding a finding to a report is adding one of these
    to :attr:`AnalysisResult.extra_findings`."""

    concept: FindingConcept
    probability: float
    threshold: float
    call: bool


@dataclass(frozen=True)
class AnalysisResult:
    """A study's outcome: the study-level call and the images it rests on.

    ``study_probability``/``positive`` are the COVID-19 finding at the model's threshold;
    ``extra_findings`` are further study-level findings reported beside it.
    """

    study_probability: float
    positive: bool
    scored: list[ScoredImage]
    model: OutputModel
    predecessor: PredecessorRef | None = None
    not_analysed_reason: str | None = None
    extra_findings: tuple[Finding, ...] = ()
    # the pneumonia-pattern finding, P(covid) + P(other pneumonia) (three-class models)
    pneumonia_probability: float | None = None
    pneumonia_positive: bool | None = None


def write_dataset(ds: Dataset, directory: Path) -> Path:
    """Write ``ds`` as ``<SOPInstanceUID>.dcm`` under ``directory``, atomically.

    A temporary file in the same directory is written, fsynced and renamed, then the
    directory is fsynced, so a crash leaves either the whole file or none: the delivery
    worker never sends half an object.

    The first file written under a UID is kept: a UID names one content (see
    :mod:`dicom_node.identity`), and a rebuild of it (with, say, a later Content Time)
    must not change the bytes that were, or will be, sent under that UID.
    """
    target = paths.under(directory, f"{paths.uid_name(str(ds.SOPInstanceUID))}.dcm")
    if target.is_file():
        log.info("outbox keeps the first file of sop=%s", ds.SOPInstanceUID)
        return target
    return write_atomically(target,
                            lambda fh: ds.save_as(fh, enforce_file_format=True))


__all__ = [
    "AnalysisResult",
    "Finding",
    "FindingConcept",
    "OutputModel",
    "PredecessorRef",
    "ScoredImage",
    "write_dataset",
]
