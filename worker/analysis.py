"""Analysis of one study generation: the state machine around the scoring pipeline.

Three steps, so that a killed worker or a duplicate message cannot produce two sets of
results:

1. :func:`claim` (one short transaction): checks the message is still wanted (study
   exists, generation current, not finished), that a production model exists, and that
   the attempt budget is not spent; then marks the study ``analysing``.
2. The work, outside any transaction: selection and pixels (:mod:`worker.study_files`,
   each file parsed once), one forward pass, heatmaps, SR and SC files (deterministic
   UIDs, so a rerun rewrites the same files).
3. :func:`finish` (one transaction): Analysis + Predictions + Study state + Delivery rows
   together.  The unique (study, model version, generation) key makes a racing duplicate
   roll back, and a generation bumped meanwhile makes the result stale and discarded.

Bad input (the data's fault) is recorded and never retried; transient trouble is raised
for the task to retry.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db import lifecycle
from db.lifecycle import AnalyseStatus
from db.models import (
    Analysis,
    AnalysisState,
    Instance,
    Prediction,
    Study,
    StudyState,
    as_utc,
    utcnow,
)
from db.session import Database
from db.settings import Settings
from db.uids import is_valid_uid
from trainer.registry import production_model
from worker import metrics
from worker.model_cache import (
    NO_PRODUCTION_MODEL,
    LoadedProductionModel,
    ModelCache,
    ModelUnavailableError,
)
from worker.outputs import previous_sr
from worker.records import Claim, ImageResult, InstanceRef, Outcome, StudyResult
from worker.study_files import load_pixels, read_instances, select_images

log = logging.getLogger(__name__)

FINISHED_STATES = (StudyState.DONE, StudyState.SKIPPED, StudyState.FAILED)


# --------------------------------------------------------------------------------- claim
def claim(
    db: Database, settings: Settings, models: ModelCache, study_id: int, generation: int,
    now: datetime | None = None,
) -> Claim | Outcome:
    """Take the study for analysis, or say why this message has nothing to do."""
    now = now or utcnow()
    with db.session() as s:
        study = s.get(Study, study_id, with_for_update=True)
        if study is None:
            return Outcome(study_id, AnalyseStatus.MISSING, "no such study")
        if study.generation != generation:
            return Outcome(study_id, AnalyseStatus.STALE,
                           f"generation {generation} superseded by {study.generation}")
        if study.state in FINISHED_STATES:
            return Outcome(study_id, AnalyseStatus.DUPLICATE, f"study already {study.state}")
        if study.state == StudyState.RECEIVING:
            return Outcome(study_id, AnalyseStatus.NOT_READY, "study is still receiving instances")
        model = models.production(s)
        if model is None:
            lifecycle.wait_for_model(study, NO_PRODUCTION_MODEL, now)
            log.warning("study waits study_uid=%s reason=%s", study.study_uid,
                        NO_PRODUCTION_MODEL)
            return Outcome(study_id, AnalyseStatus.WAITING, NO_PRODUCTION_MODEL)
        existing = s.scalars(select(Analysis).where(
            Analysis.study_id == study_id, Analysis.model_version_id == model.id,
            Analysis.generation == generation)).first()
        if existing is not None:
            return Outcome(study_id, AnalyseStatus.DUPLICATE, "analysis already stored",
                           existing.id)
        study.attempts = (study.attempts or 0) + 1
        # Every claim counts: Celery's retries after a transient fault and redeliveries
        # after a lost worker spend one budget.  Celery stops retrying at the same count
        # (worker.app.task_policy), so its last retry still runs here and records the
        # real error; only a study that keeps losing its worker ends here.
        budget = settings.max_analysis_attempts
        if study.attempts > budget:
            reason = (f"gave up after {budget} attempts "
                      "(worker lost or message redelivered)")
            _record_failure(s, study, model.id, generation, reason, now)
            return Outcome(study_id, AnalyseStatus.GAVE_UP, reason)
        queued_at = as_utc(study.queued_at)
        if queued_at is not None:
            metrics.observe_queue_wait((now - queued_at).total_seconds())
        lifecycle.start_analysis(study, now)
        instances = s.scalars(
            select(Instance).where(Instance.study_id == study_id).order_by(Instance.id)
        ).all()
        refs = tuple(InstanceRef(i.id, i.sop_instance_uid, Path(i.path)) for i in instances)
        return Claim(study_id, study.study_uid, generation, study.attempts, model, refs)


def _record_failure(s: Session, study: Study, model_version_id: int | None, generation: int,
                    reason: str, now: datetime) -> None:
    lifecycle.fail_study(study, reason, now)
    existing = s.scalars(select(Analysis).where(
        Analysis.study_id == study.id, Analysis.model_version_id == model_version_id,
        Analysis.generation == generation)).first()
    if existing is None:
        s.add(Analysis(study_id=study.id, model_version_id=model_version_id,
                       generation=generation, state=AnalysisState.FAILED, reason=reason,
                       started_at=now, finished_at=now))
    log.error("study failed study_uid=%s reason=%s", study.study_uid, reason)


def mark_failed(db: Database, study_id: int, generation: int, reason: str,
                now: datetime | None = None) -> bool:
    """Record a study as failed (retries spent); False when the message is no longer current."""
    now = now or utcnow()
    with db.session() as s:
        study = s.get(Study, study_id, with_for_update=True)
        if study is None or study.generation != generation or study.state in FINISHED_STATES:
            return False
        model = production_model(s)
        _record_failure(s, study, model.id if model else None, generation, reason, now)
        return True


def release_waiting(db: Database, study_id: int, generation: int, reason: str,
                    now: datetime | None = None) -> None:
    """Put a claimed study back to ``queued`` with a reason (the model became unusable);
    the reconciler re-publishes it later."""
    now = now or utcnow()
    with db.session() as s:
        study = s.get(Study, study_id, with_for_update=True)
        if study is None or study.generation != generation or study.state != StudyState.ANALYSING:
            return
        lifecycle.release_study(study, reason, now)
        log.warning("study waits study_uid=%s reason=%s", study.study_uid, reason)


# ---------------------------------------------------------------------------------- work
def score_images(images: list[ImageResult], model: LoadedProductionModel,
                 settings: Settings, study_uid: str) -> None:
    """Score every scored image of the study through the model's scorer (the one that
    chose its thresholds), and draw one heatmap each: Grad-CAM from the very forward pass
    that gave the probability, or occlusion.

    CUDA out-of-memory surfaces from the scorer as TransientError (retried)."""
    from worker.heatmap_store import save_heatmap

    scored = [img for img in images if img.scored and img.image is not None]
    if not scored:
        return
    pixels = [img.image for img in scored if img.image is not None]
    t0 = time.perf_counter()
    if settings.heatmap_method == "gradcam":
        maps, probs, pneu = model.scorer.findings_and_gradcam(pixels)
        forward_s, heatmap_s = 0.0, time.perf_counter() - t0
    else:
        probs, pneu = model.scorer.predict_findings(pixels)
        forward_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        maps = compute_heatmaps(pixels, model, settings)
        heatmap_s = time.perf_counter() - t1
    pattern = [None] * len(scored) if pneu is None else [float(v) for v in pneu]
    for img, p, pp, heat in zip(scored, probs, pattern, maps, strict=True):
        img.probability = float(p)
        img.pneumonia_probability = pp
        img.timings["forward_s"] = forward_s / len(scored)
        img.timings["heatmap_s"] = heatmap_s / len(scored)
        img.heatmap = heat
        img.heatmap_path = save_heatmap(heat, settings, study_uid,
                                        img.instance.sop_instance_uid)


def compute_heatmaps(images01: list[np.ndarray], model: LoadedProductionModel,
                     settings: Settings) -> list[np.ndarray]:
    """Occlusion maps at source resolution, image by image (each batches its own windows)
    through the model's scorer.  Grad-CAM is drawn with the probabilities in
    :func:`score_images`."""
    return [model.scorer.heatmap(img, settings) for img in images01]


def summarise(images: list[ImageResult], threshold: float,
              pneumonia_threshold: float | None = None) -> StudyResult:
    """Study probability is the max over scored images (each finding on its own, at its
    own threshold); nothing scored means skipped, or failed where the only reason was bad
    input."""
    scored = [i for i in images if i.scored and i.probability is not None]
    if scored:
        prob = max(float(i.probability) for i in scored)  # type: ignore[arg-type]
        result = StudyResult(StudyState.DONE, None, images, prob, prob >= threshold)
        pattern = [i.pneumonia_probability for i in scored if i.pneumonia_probability is not None]
        if pattern and pneumonia_threshold is not None:
            result.pneumonia_probability = max(pattern)
            result.pneumonia_positive = result.pneumonia_probability >= pneumonia_threshold
            result.pneumonia_threshold = pneumonia_threshold
        return result
    reasons = sorted({i.skip_reason or "not selected" for i in images})
    if not images:
        return StudyResult(StudyState.SKIPPED, "study has no instances", images)
    if any(i.bad_input for i in images):
        return StudyResult(StudyState.FAILED, "; ".join(reasons), images)
    return StudyResult(StudyState.SKIPPED, "no scorable image: " + "; ".join(reasons), images)


def compute(claim_: Claim, model: LoadedProductionModel, settings: Settings) -> StudyResult:
    """Steps 2: everything between claiming and storing; touches no database."""
    t0 = time.perf_counter()
    datasets = read_instances(claim_.instances)  # each file parsed once per analysis
    images = select_images(claim_.instances, datasets, settings)
    load_pixels(images)
    score_images(images, model, settings, claim_.study_uid)
    result = summarise(images, model.info.threshold, model.loaded.meta.pneumonia_threshold)
    result.timings["total_s"] = time.perf_counter() - t0
    return result


# -------------------------------------------------------------------------------- finish
def finish(
    db: Database, settings: Settings, claim_: Claim, result: StudyResult,
    outputs: list[Any], sr_uid: str | None, now: datetime | None = None,
) -> Outcome:
    """Store the analysis, its predictions, the study's state and the outbox rows in one
    transaction; a concurrent duplicate or a newer generation makes this a no-op."""
    from worker.delivery import create_deliveries

    now = now or utcnow()
    try:
        with db.session() as s:
            study = s.get(Study, claim_.study_id, with_for_update=True)
            if study is None:
                return Outcome(claim_.study_id, AnalyseStatus.MISSING, "study vanished")
            if study.generation != claim_.generation:
                log.info("stale result discarded study_uid=%s generation=%s current=%s",
                         claim_.study_uid, claim_.generation, study.generation)
                return Outcome(claim_.study_id, AnalyseStatus.STALE, "newer generation arrived")
            if study.state != StudyState.ANALYSING:
                return Outcome(claim_.study_id, AnalyseStatus.DUPLICATE,
                               f"study already {study.state}")
            for previous in s.scalars(select(Analysis).where(
                    Analysis.study_id == study.id, Analysis.state == AnalysisState.DONE)):
                previous.state = AnalysisState.SUPERSEDED
            analysis = Analysis(
                study_id=study.id, model_version_id=claim_.model.id,
                generation=claim_.generation, state=AnalysisState(result.state.value),
                reason=result.reason, probability=result.probability,
                positive=result.positive, threshold=claim_.model.threshold,
                pneumonia_probability=result.pneumonia_probability,
                pneumonia_positive=result.pneumonia_positive,
                pneumonia_threshold=result.pneumonia_threshold,
                heatmap_method=settings.heatmap_method, started_at=now,
                finished_at=utcnow(), timings=dict(result.timings),
                sr_sop_instance_uid=sr_uid,
            )
            s.add(analysis)
            s.flush()
            for img in result.images:
                s.add(Prediction(
                    analysis_id=analysis.id, instance_id=img.instance.id, scored=img.scored,
                    probability=img.probability,
                    pneumonia_probability=img.pneumonia_probability,
                    heatmap_path=str(img.heatmap_path) if img.heatmap_path else None,
                    skip_reason=img.skip_reason, timings=dict(img.timings),
                ))
            deliveries = create_deliveries(s, settings, study.id, analysis.id, outputs, now)
            lifecycle.finish_study(study, result.state, result.reason, utcnow())
            s.flush()
            outcome = Outcome(study.id, AnalyseStatus(result.state.value), result.reason,
                              analysis.id, tuple(d.id for d in deliveries))
    except IntegrityError:
        log.info("duplicate analysis discarded study_uid=%s generation=%s",
                 claim_.study_uid, claim_.generation)
        return Outcome(claim_.study_id, AnalyseStatus.DUPLICATE,
                       "analysis stored by another worker")
    log.info(
        "study analysed study_uid=%s generation=%s state=%s model=%s probability=%s "
        "pneumonia_probability=%s method=%s reason=%s",
        claim_.study_uid, claim_.generation, outcome.status, claim_.model.version,
        None if result.probability is None else round(result.probability, 4),
        None if result.pneumonia_probability is None else round(result.pneumonia_probability, 4),
        settings.heatmap_method, result.reason,
    )
    return outcome


# ---------------------------------------------------------------------------- the whole
def analyse_study(
    db: Database, settings: Settings, models: ModelCache, study_id: int, generation: int,
) -> Outcome:
    """Analyse one study generation end to end; see the module docstring."""
    from worker.outputs import write_outputs

    claimed = claim(db, settings, models, study_id, generation)
    if isinstance(claimed, Outcome):
        if claimed.status != AnalyseStatus.WAITING:
            log.info("analyse message has nothing to do study_id=%s generation=%s status=%s",
                     study_id, generation, claimed.status)
        return claimed
    if not is_valid_uid(claimed.study_uid):
        # Only rows written around the listener can hold one; the listener refuses them.
        reason = "bad input: invalid StudyInstanceUID"
        mark_failed(db, study_id, generation, reason)
        return Outcome(study_id, AnalyseStatus.FAILED, reason)
    try:
        model = models.get(claimed.model)
    except ModelUnavailableError as exc:
        release_waiting(db, study_id, generation, str(exc))
        return Outcome(study_id, AnalyseStatus.WAITING, str(exc))
    result = compute(claimed, model, settings)
    metrics.observe_inference(result.timings.get("total_s", 0.0), claimed.model.version)
    if result.positive is not None:
        metrics.prediction_made(claimed.model.version, result.positive)
    predecessor = previous_sr(db, study_id)
    outputs, sr_uid = write_outputs(settings, claimed, model, result, predecessor)
    return finish(db, settings, claimed, result, outputs, sr_uid)
