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

from db import paths
from db.models import StudyState
from db.session import Database
from db.settings import Settings
from dicom_node import identity
from dicom_node.results import (
    AnalysisResult,
    OutputModel,
    PredecessorRef,
    ScoredImage,
    write_dataset,
)
from worker.records import Claim, StudyResult

if TYPE_CHECKING:
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
    path: str | None = None  # the outbox file it was delivered from
    sent_as: tuple[str, str] | None = None  # (class, UID) it was delivered as, if another


def model_info(model: LoadedProductionModel, settings: Settings) -> OutputModel:
    info = model.info
    return OutputModel(
        name=MODEL_NAME, version=info.version, sha256=info.sha256,
        architecture=info.architecture, threshold=info.threshold,
        heatmap_method=settings.heatmap_method, manufacturer=settings.manufacturer,
        pneumonia_threshold=model.loaded.meta.pneumonia_threshold,
    )


def study_outbox(settings: Settings, study_uid: str) -> Path:
    """The study's outbox folder, named through the safe-path helper."""
    return paths.under(settings.outbox_dir, paths.uid_name(study_uid))


def predecessor_ref(settings: Settings, study_uid: str,
                    previous: PreviousSr | None) -> PredecessorRef | None:
    """The earlier SR's identity: read from its outbox file, else derived the way the
    builder derived it."""
    if previous is None:
        return None
    outbox = study_outbox(settings, study_uid)
    path = (paths.check_inside(settings.data_dir, Path(previous.path)) if previous.path else
            paths.under(outbox, f"{paths.uid_name(previous.sop_instance_uid)}.dcm"))
    if path.is_file():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sop_class, sop_uid = previous.sent_as or (str(ds.SOPClassUID),
                                                  str(ds.SOPInstanceUID))
        return PredecessorRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                              sop_class, sop_uid)
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
    outputs.extend(_viewer_objects(analysis, settings, folder))
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


def _viewer_objects(analysis: AnalysisResult, settings: Settings,
                    folder: Path) -> list[OutputFile]:
    """The optional GSPS per scored image and KOS for a positive study (default off)."""
    from dicom_node.presentation import build_hotspot_gsps, build_positive_kos

    out: list[OutputFile] = []
    institution = settings.institution_name or None
    if settings.hotspot_presentation_state:
        for image in analysis.scored:
            gsps = build_hotspot_gsps(image, analysis.model, institution)
            if gsps is not None:
                out.append(OutputFile("gsps", str(gsps.SOPInstanceUID),
                                      write_dataset(gsps, folder)))
    if settings.key_object_for_positive and analysis.positive:
        kos = build_positive_kos([i.source for i in analysis.scored], analysis.model,
                                 institution)
        out.append(OutputFile("kos", str(kos.SOPInstanceUID), write_dataset(kos, folder)))
    return out


def previous_sr(db: Database, study_id: int) -> PreviousSr | None:
    """The SR the study's next SR replaces, for its Predecessor Documents Sequence.

    The latest SR of the study that reached the PACS; where none has yet, the latest one
    still on its way there (pending or sending).  A failed delivery never reached the
    PACS and is not named.
    """
    from sqlalchemy import select

    from db.models import Analysis, Delivery, DeliveryState, ModelVersion

    with db.session() as s:
        rows = s.execute(
            select(Delivery.sop_instance_uid, Delivery.path, Delivery.state,
                   ModelVersion.version, ModelVersion.sha256, Delivery.reason)
            .join(Analysis, Analysis.id == Delivery.analysis_id)
            .join(ModelVersion, ModelVersion.id == Analysis.model_version_id)
            .where(Delivery.study_id == study_id, Delivery.kind == "sr",
                   Delivery.state != DeliveryState.FAILED)
            .order_by(Delivery.id.desc())
        ).all()
    delivered = [r for r in rows if r[2] == DeliveryState.DELIVERED]
    candidates = delivered or list(rows)
    if not candidates:
        return None
    row = candidates[0]
    from worker.delivery import parse_sent_as

    # Delivered in another SR class: the PACS holds that object, so it is the one named.
    sent_as = parse_sent_as(row[5]) if row[2] == DeliveryState.DELIVERED else None
    return PreviousSr(str(row[0]), str(row[3]), str(row[4]), path=str(row[1]),
                      sent_as=sent_as)
