"""Build the SR and the heatmap SCs of an analysis and write them to the outbox.

The builders (``dicom_node.sr``, ``dicom_node.sc``) are pure functions with deterministic
UIDs, so a rerun after a killed worker rewrites the very same files; the Delivery rows
that point at them are written later, in the analysis transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset

from db.models import StudyState
from db.settings import Settings
from dicom_node import identity
from dicom_node.results import (
    AnalysisResult,
    ModelInfo,
    PredecessorRef,
    ScoredImage,
    write_dataset,
)

if TYPE_CHECKING:
    from worker.analysis import Claim, StudyResult
    from worker.model_cache import LoadedProductionModel

log = logging.getLogger(__name__)

MODEL_NAME = "cxr-triage COVID-19"


@dataclass(frozen=True)
class OutputFile:
    """One DICOM object in the outbox, ready for Delivery rows."""

    kind: str  # sr or sc
    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class PreviousSr:
    """The SR of an earlier analysis of the study, as the database knows it."""

    sop_instance_uid: str
    model_version: str
    model_sha256: str


def model_info(model: LoadedProductionModel, settings: Settings) -> ModelInfo:
    info = model.info
    return ModelInfo(
        name=MODEL_NAME, version=info.version, sha256=info.sha256,
        architecture=info.architecture, threshold=info.threshold,
        heatmap_method=settings.heatmap_method, manufacturer=settings.manufacturer,
        pneumonia_threshold=model.loaded.meta.pneumonia_threshold,
    )


def study_outbox(settings: Settings, study_uid: str) -> Path:
    return settings.outbox_dir / study_uid


def predecessor_ref(settings: Settings, study_uid: str,
                    previous: PreviousSr | None) -> PredecessorRef | None:
    """The earlier SR's identity: read from its outbox file, else derived the way the
    builder derived it."""
    if previous is None:
        return None
    path = study_outbox(settings, study_uid) / f"{previous.sop_instance_uid}.dcm"
    if path.is_file():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return PredecessorRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                              str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    return PredecessorRef(
        study_uid,
        identity.series_uid(identity.SR, study_uid, previous.model_version,
                            previous.model_sha256),
        pydicom.uid.Comprehensive3DSRStorage,
        previous.sop_instance_uid,
    )


def write_outputs(
    settings: Settings, claim: Claim, model: LoadedProductionModel, result: StudyResult,
    previous: PreviousSr | None,
) -> tuple[list[OutputFile], str | None]:
    """Write the study's SR and one SC per scored image; return them and the SR's UID.

    Skipped and failed studies get no objects, unless ``settings.not_analysed_report``
    asks for the builder's not-analysed SR.
    """
    from dicom_node.sr import build_not_analysed_sr, build_sr

    folder = study_outbox(settings, claim.study_uid)
    minfo = model_info(model, settings)
    predecessor = predecessor_ref(settings, claim.study_uid, previous)
    institution = settings.institution_name or None
    outputs: list[OutputFile] = []
    if result.state != StudyState.DONE:
        if not settings.not_analysed_report:
            return [], None
        sources = [i.header for i in result.images if i.header is not None]
        if not sources:
            return [], None
        sr = build_not_analysed_sr(sources, result.reason or "not analysed", minfo,
                                   predecessor, institution)
        path = write_dataset(sr, folder)
        return [OutputFile("sr", str(sr.SOPInstanceUID), path)], str(sr.SOPInstanceUID)
    scored = [
        ScoredImage(source=i.header, probability=float(i.probability),
                    heatmap=i.heatmap, image01=i.image,  # type: ignore[arg-type]
                    pneumonia_probability=i.pneumonia_probability)
        for i in result.images if i.scored and i.probability is not None
    ]
    analysis = AnalysisResult(
        study_probability=float(result.probability),  # type: ignore[arg-type]
        positive=bool(result.positive), scored=scored, model=minfo, predecessor=predecessor,
        pneumonia_probability=result.pneumonia_probability,
        pneumonia_positive=result.pneumonia_positive,
    )
    sr = build_sr(analysis, institution)
    outputs.append(OutputFile("sr", str(sr.SOPInstanceUID), write_dataset(sr, folder)))
    for sc in build_scs(analysis, settings):
        outputs.append(OutputFile("sc", str(sc.SOPInstanceUID), write_dataset(sc, folder)))
    log.info("outputs written study_uid=%s sr_uid=%s objects=%s", claim.study_uid,
             sr.SOPInstanceUID, len(outputs))
    return outputs, str(sr.SOPInstanceUID)


def build_scs(analysis: AnalysisResult, settings: Settings) -> list[Dataset]:
    """One heatmap Secondary Capture per scored image that has a heatmap."""
    from dicom_node.sc import build_heatmap_sc

    out: list[Dataset] = []
    for image in analysis.scored:
        if image.heatmap is None:
            continue
        sc: Any = build_heatmap_sc(image, analysis.model,
                                   institution_name=settings.institution_name or None)
        out.append(sc)
    return out
