"""The steps of a nightly run: gather -> train -> evaluate -> decide -> publish.

Each step is a plain function over small dataclasses; :mod:`trainer.retrain` runs them
under the lock and records a failure.  Only :func:`publish` writes the registry, and it
does so in one transaction: the challenger's row, every evaluation of the run, the
promotion (or hold or rejection) and the run's own ``done`` row commit together, so a crash
at any point leaves either all of them or none, and never a run left ``running`` beside a
promoted model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import paths
from db.models import Evaluation, RetrainRun, utcnow
from db.session import Database
from db.settings import Settings
from dicom_node.pixels import load_image_file
from trainer.checkpoint import LoadedModel, ModelMeta, load_checkpoint, save_checkpoint
from trainer.datasets import ImageRecord, describe, drop_unreadable, load_records
from trainer.drift import deployed_record, drift_summary
from trainer.evaluate import evaluate_records
from trainer.metrics import delong_paired
from trainer.near_duplicates import perceptual_hash
from trainer.promotion import AWAITING_APPROVAL, floor_reasons, floor_summary, hold, metrics_line
from trainer.registry import ModelInfo, model_id, promote, register_model, reject
from trainer.report import ModelScores, write_report
from trainer.splits import Split, near_duplicate_patients, split_records
from trainer.train import TrainConfig, TrainingError, TrainResult, train_model

log = logging.getLogger(__name__)


@dataclass
class Gathered:
    """Labelled images with received files, split by patient."""

    records: list[ImageRecord]
    unreadable: list[str]
    train: list[ImageRecord]
    validation: list[ImageRecord]
    test: list[ImageRecord]
    # patients joined by near-duplicate films -> the patient whose split they share
    linked_patients: dict[str, str] = field(default_factory=dict)


@dataclass
class Evaluated:
    """Champion and challenger scored on the same test patients."""

    challenger: dict[str, Any]
    challenger_scores: np.ndarray
    champion: dict[str, Any] | None
    champion_scores: np.ndarray | None
    labels: np.ndarray


@dataclass
class Decision:
    promote: bool
    below_floor: list[str]
    needs_approval: bool
    reasons: list[str]
    name: str  # promoted, needs approval, held, kept (or "dry-run (would be ...)")


@dataclass
class Publication:
    """What :func:`publish` writes, all in one transaction."""

    version: str
    meta: ModelMeta
    report_index: Path
    decision: Decision
    dataset_name: str
    test_study_uids: list[str]
    drift_metrics: dict[str, Any] | None = None
    drift_report: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def compare(champion: Mapping[str, Any] | None, challenger: Mapping[str, Any],
            settings: Settings) -> tuple[bool, list[str]]:
    """Whether the challenger may replace the champion, and why (numbers in each reason)."""
    if champion is None:
        return True, ["no production model: the first model needs only to clear the "
                      "promotion floor (bootstrap)"]
    reasons = []
    ok = True
    a_ch, a_c = challenger.get("auc"), champion.get("auc")
    if a_ch is None or a_c is None:
        return False, ["test patients lack one class: ROC AUC undefined, champion kept"]
    if a_ch < a_c - settings.promotion_auc_margin:
        ok = False
        reasons.append(f"AUC {a_ch:.4f} is below the champion's {a_c:.4f} by more than "
                       f"{settings.promotion_auc_margin}")
    else:
        reasons.append(f"AUC {a_ch:.4f} vs champion {a_c:.4f} (margin "
                       f"{settings.promotion_auc_margin}): not worse")
    s_ch, s_c = challenger.get("specificity"), champion.get("specificity")
    if s_ch is None or s_c is None:
        ok = False
        reasons.append("specificity undefined on the test patients (no negatives)")
    elif s_ch < s_c - settings.promotion_specificity_margin:
        ok = False
        reasons.append(f"specificity at target sensitivity {s_ch:.4f} is below the champion's "
                       f"{s_c:.4f} by more than {settings.promotion_specificity_margin}")
    else:
        reasons.append(f"specificity at target sensitivity {s_ch:.4f} vs champion {s_c:.4f} "
                       f"(margin {settings.promotion_specificity_margin}): not worse")
    return ok, reasons


def _summary(m: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("n", "n_positive", "patients", "auc", "auc_ci", "pr_auc", "threshold",
            "sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "ppv", "npv",
            "f1", "accuracy", "brier", "positive_rate", "confusion", "threshold_table",
            "reliability")
    out = {k: m.get(k) for k in keys}
    out["per_source"] = {
        k: {kk: v.get(kk) for kk in ("n", "n_positive", "auc", "auc_ci", "sensitivity",
                                     "sensitivity_ci", "specificity", "specificity_ci")}
        for k, v in (m.get("per_source") or {}).items()
    }
    return out


def gather(db: Database, settings: Settings, datasets: Sequence[Path]) -> Gathered:
    """Labelled images (database studies and ``datasets`` folders), split by patient."""
    records, unreadable = drop_unreadable(load_records(db, settings, list(datasets)))
    linked = linked_patients(records)
    parts = split_records(records, settings.split_key, settings.split_fractions, linked)
    return Gathered(records, unreadable, parts[Split.TRAIN], parts[Split.VALIDATION],
                    parts[Split.TEST], linked)


def linked_patients(records: Sequence[ImageRecord]) -> dict[str, str]:
    """Patients whose films are near-duplicates of another patient's (the same film
    published twice), each mapped to the patient whose split the group shares."""
    t0 = time.perf_counter()
    hashes = {r.key: perceptual_hash(load_image_file(r.path)) for r in records}
    linked = near_duplicate_patients({r.key: r.patient_key for r in records}, hashes)
    moved = sorted(p for p, root in linked.items() if p != root)
    log.info("near-duplicate films across patients: %d patient(s) placed with another "
             "(%s) in %.1fs", len(moved), ", ".join(f"{p}->{linked[p]}" for p in moved[:10])
             or "none", time.perf_counter() - t0)
    return linked


def require_both_classes(gathered: Gathered) -> None:
    """Refuse to train where the test patients cannot show a challenger's worth."""
    if not gathered.test or len({r.label for r in gathered.test}) < 2:
        raise TrainingError("the test patients do not hold both classes; label more studies")


def train(settings: Settings, gathered: Gathered, overrides: Mapping[str, Any],
          warm_start: bool, champion: ModelInfo | None
          ) -> tuple[TrainResult, LoadedModel | None]:
    """The challenger, warm-started from the champion; the loaded champion too."""
    cfg = TrainConfig.from_settings(settings, **overrides)
    init: LoadedModel | None = None
    if champion is not None:
        init = load_checkpoint(Path(champion.path), expected_sha256=champion.sha256)
    result = train_model(gathered.train, gathered.validation, cfg,
                         init=init if warm_start else None,
                         cache_root=settings.data_dir / "cache" / "features",
                         parent_version=champion.version if champion else None)
    return result, init


def evaluate(settings: Settings, gathered: Gathered, result: TrainResult,
             init: LoadedModel | None) -> Evaluated:
    """Champion and challenger on the same test patients, through the full network."""
    test = gathered.test
    chal_eval, chal_p = evaluate_records(result.model, result.meta, test,
                                         target_sensitivity=settings.target_sensitivity)
    champ_eval: dict[str, Any] | None = None
    champ_p = None
    if init is not None:
        champ_eval, champ_p = evaluate_records(init.model, init.meta, test,
                                               target_sensitivity=settings.target_sensitivity)
    return Evaluated(chal_eval, chal_p, champ_eval, champ_p, np.array([r.label for r in test]))


def decide(settings: Settings, ev: Evaluated, unreadable: list[str],
           dry_run: bool) -> Decision:
    """Promote, ask for approval, hold below the floor, or keep the champion; and why."""
    promote_ok, reasons = compare(ev.champion, ev.challenger, settings)
    below_floor = floor_reasons(ev.challenger, settings)
    if below_floor:
        promote_ok = False
        reasons = [f"below the promotion floor: {r}" for r in below_floor] + reasons
    else:
        reasons.append(f"promotion floor met ({floor_summary(settings)})")
    needs_approval = promote_ok and settings.promotion_requires_approval
    if unreadable:
        shown = "; ".join(unreadable[:20]) + (" …" if len(unreadable) > 20 else "")
        reasons.append(f"{len(unreadable)} image(s) left out as unreadable: {shown}")
    if ev.champion_scores is not None:
        paired = delong_paired(ev.labels, ev.champion_scores, ev.challenger_scores)
        if paired["diff"] is not None:
            reasons.append(
                f"paired DeLong AUC difference (challenger - champion) {paired['diff']:+.4f} "
                f"[{paired['ci_low']:+.4f}, {paired['ci_high']:+.4f}], p={paired['p_value']:.3g}"
            )
    name = ("needs approval" if needs_approval else "promoted" if promote_ok
            else "held" if below_floor else "kept")
    if dry_run:
        name = f"dry-run (would be {name})"
    return Decision(promote_ok, below_floor, needs_approval, reasons, name)


def drift(db: Database, settings: Settings, gathered: Gathered, init: LoadedModel | None,
          champion: ModelInfo | None, new_ids: set[int]
          ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The champion on studies labelled since the last run (it never trained on them):
    the drift summary and the metrics to record."""
    if init is None or champion is None or not new_ids:
        return None, None
    recent = [r for r in gathered.records if r.study_id in new_ids]
    if not recent:
        return None, None
    recent_eval, _ = evaluate_records(init.model, init.meta, recent,
                                      target_sensitivity=settings.target_sensitivity)
    return drift_summary(reference_metrics(db, champion.version), recent_eval), recent_eval


def reference_metrics(db: Database, version: str) -> dict[str, Any] | None:
    with db.session() as s:
        ev = s.scalar(select(Evaluation).where(
            Evaluation.model_version_id == model_id(s, version), Evaluation.kind == "test"
        ).order_by(Evaluation.id))
        return dict(ev.metrics_json) if ev is not None else None


def challenger_meta(result: TrainResult, version: str, datasets: Sequence[Path],
                    gathered: Gathered) -> ModelMeta:
    """The challenger's meta with its version and provenance (data, history, timings)."""
    meta = result.meta
    extra = dict(meta.provenance.extra)
    train_studies = sorted({r.study_uid for r in gathered.train + gathered.validation
                            if r.study_uid})
    extra.update(datasets=[str(d) for d in datasets], train_study_uids=train_studies,
                 test=describe(gathered.test), history=result.history, timings=result.timings)
    return replace(meta, version=version, provenance=replace(meta.provenance, extra=extra))


def report(db: Database, settings: Settings, run_id: int, report_dir: Path,
           champion: ModelInfo | None, init: LoadedModel | None, gathered: Gathered,
           ev: Evaluated, decision: Decision, version: str, meta: ModelMeta,
           summary: dict[str, Any], drift_out: dict[str, Any] | None) -> Path:
    """The run's HTML report; returns its index."""
    test = gathered.test
    models = []
    if ev.champion is not None and ev.champion_scores is not None and champion is not None:
        models.append(ModelScores(f"champion {champion.version}", ev.labels,
                                  ev.champion_scores, [r.source for r in test],
                                  init.meta.threshold if init else 0.5, ev.champion))
    models.append(ModelScores(f"challenger {version}", ev.labels, ev.challenger_scores,
                              [r.source for r in test], meta.threshold, ev.challenger))
    return write_report(report_dir, f"Nightly retrain run {run_id}", models, summary=summary,
                        reasons=decision.reasons, deployed=deployed_record(db),
                        drift=drift_out,
                        notes=["Sources are confounded with labels in public data: read the "
                               "per-source table, not only the overall figures."])


def record_evaluation(s: Session, version: str, run_id: int, kind: str, dataset: str,
                      metrics: Mapping[str, Any], report_path: str | None,
                      extra: Mapping[str, Any] | None = None) -> None:
    s.add(Evaluation(
        model_version_id=model_id(s, version), run_id=run_id, kind=kind, dataset=dataset,
        n_images=int(metrics.get("n") or 0), auc=metrics.get("auc"),
        sensitivity=metrics.get("sensitivity"), specificity=metrics.get("specificity"),
        metrics_json={**_summary(metrics), **(extra or {})}, report_path=report_path,
    ))


def finish(s: Session, run_id: int, **fields: Any) -> None:
    """Close the run row in the caller's transaction."""
    run = s.get(RetrainRun, run_id)
    assert run is not None
    for k, v in fields.items():
        setattr(run, k, v)
    run.finished_at = utcnow()


def publish(db: Database, settings: Settings, run_id: int, result: TrainResult,
            champion: ModelInfo | None, ev: Evaluated, pub: Publication) -> None:
    """Write the model file, then in ONE transaction: register the challenger, record the
    run's evaluations, promote / hold / reject it, and mark the run done."""
    path = paths.under(settings.models_dir, f"{pub.version}.pt")
    sha = save_checkpoint(path, result.model, pub.meta)  # a file without a row is harmless
    meta = pub.meta
    reg_meta = {**meta.to_dict(), "parent_version": meta.provenance.parent_version,
                "metrics": {k: ev.challenger.get(k) for k in ("auc", "sensitivity",
                                                              "specificity")},
                "validation": _summary(result.val_metrics), "run_id": run_id}
    d = pub.decision
    index = str(pub.report_index)
    with db.session() as s:
        if champion is not None and pub.drift_metrics is not None:
            record_evaluation(s, champion.version, run_id, "drift", "recent labels",
                              pub.drift_metrics, pub.drift_report)
        register_model(s, path, meta=reg_meta, version=pub.version, sha256=sha)
        test_uids = {"test_study_uids": pub.test_study_uids}
        record_evaluation(s, pub.version, run_id, "test", pub.dataset_name, ev.challenger,
                          index, test_uids)
        if champion is not None and ev.champion is not None:
            record_evaluation(s, champion.version, run_id, "test", pub.dataset_name,
                              ev.champion, index, test_uids)
        if d.needs_approval:
            hold(s, pub.version, AWAITING_APPROVAL)
        elif d.promote:
            promote(s, pub.version)
        elif d.below_floor:  # stays a candidate, with the reason on the row
            hold(s, pub.version,
                 "; ".join(f"below the promotion floor: {r}" for r in d.below_floor))
        else:
            reject(s, pub.version, "; ".join(d.reasons))
        finish(s, run_id, status="done", decision=d.name, reasons=d.reasons,
               report_path=index, challenger_version=pub.version)


def summary_table(settings: Settings, run_id: int, champion: ModelInfo | None,
                  version: str, gathered: Gathered, new_ids: set[int], result: TrainResult,
                  meta: ModelMeta, decision: Decision, test_summary: str,
                  started: float) -> dict[str, Any]:
    """The key figures at the top of the report."""
    train, val, test = gathered.train, gathered.validation, gathered.test
    return {"run": run_id, "decision": decision.name,
            "champion": champion.version if champion else "none", "challenger": version,
            "images": len(gathered.records),
            "train / validation / test images": f"{len(train)} / {len(val)} / {len(test)}",
            "test patients": len({r.patient_key for r in test}),
            "new labels since last run": len(new_ids),
            "images left out as unreadable": len(gathered.unreadable),
            "challenger on test (95% intervals)": test_summary,
            "validation AUC": result.val_metrics.get("auc"),
            "validation pneumonia-pattern AUC": result.val_metrics.get("pneumonia_auc"),
            "pneumonia-pattern threshold": meta.pneumonia_threshold,
            "threshold (validation, target sensitivity "
            f"{settings.target_sensitivity})": meta.threshold,
            "training time (s)": round(time.perf_counter() - started, 1)}


__all__ = ["Decision", "Evaluated", "Gathered", "Publication", "compare", "decide",
           "evaluate", "gather", "metrics_line", "publish", "train"]
