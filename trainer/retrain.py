"""The nightly champion/challenger run: ``python -m trainer.retrain [--dataset DIR] [--dry-run]``.

1. Take the lock (``data_dir/retrain.lock``, fcntl): one run at a time.
2. With a champion and fewer than ``min_new_labels`` labels since the last run: a clean
   no-op.  Without a champion: bootstrap, the first model trained is promoted.
3. Gather labelled images (database studies + ``--dataset`` folders), split by patient with
   the keyed hash; train a challenger from the champion on train/validation patients.
4. Score champion and challenger on the same test patients.  Promote only if the challenger
   is not worse than the champion beyond ``promotion_auc_margin`` (ROC AUC) and
   ``promotion_specificity_margin`` (specificity at the threshold each chose on validation
   for ``target_sensitivity``).
5. Re-evaluate the champion on recently labelled studies (drift) and join stored
   predictions with labels (the record as deployed); write the report; record the run.

The champion changes only in the final promote transaction, so a crash at any step leaves
it untouched; the run row then says ``failed`` with the error.

Exit codes (cron): 0 done or clean no-op, 1 failure, 2 usage/configuration, 3 another run
holds the lock.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from db import paths
from db.models import Evaluation, RetrainRun, utcnow
from db.session import Database
from db.settings import Settings, SettingsError, load_settings
from trainer.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from trainer.datasets import (
    DatasetError,
    ImageRecord,
    describe,
    drop_unreadable,
    load_records,
)
from trainer.drift import (
    deployed_record,
    drift_summary,
    last_completed_run_start,
    new_label_study_ids,
)
from trainer.evaluate import evaluate_records
from trainer.metrics import delong_paired
from trainer.promotion import AWAITING_APPROVAL, floor_reasons, floor_summary, hold, metrics_line
from trainer.registry import (
    ModelInfo,
    model_id,
    production_model,
    promote,
    register_model,
    reject,
)
from trainer.report import ModelScores, write_report
from trainer.splits import Split, split_records
from trainer.train import TrainConfig, TrainingError, train_model

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3


class LockedError(RuntimeError):
    """Another retrain run holds the lock."""


@contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """An exclusive, non-blocking fcntl lock; released by the kernel if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LockedError(f"another retrain run holds {path}") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


@dataclass
class RunOutcome:
    exit_code: int
    status: str  # done, noop, failed, locked
    run_id: int | None = None
    decision: str | None = None
    reasons: list[str] = field(default_factory=list)
    champion: str | None = None
    challenger: str | None = None
    report: Path | None = None
    test_summary: str | None = None  # the challenger's AUC, sensitivity, specificity + CIs
    splits: dict[str, list[ImageRecord]] = field(default_factory=dict)


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


def _record_evaluation(db: Database, version: str, run_id: int, kind: str, dataset: str,
                       metrics: Mapping[str, Any], report: str | None,
                       extra: Mapping[str, Any] | None = None) -> None:
    with db.session() as s:
        s.add(Evaluation(
            model_version_id=model_id(db, version), run_id=run_id, kind=kind, dataset=dataset,
            n_images=int(metrics.get("n") or 0), auc=metrics.get("auc"),
            sensitivity=metrics.get("sensitivity"), specificity=metrics.get("specificity"),
            metrics_json={**_summary(metrics), **(extra or {})}, report_path=report,
        ))


def _finish(db: Database, run_id: int, **fields: Any) -> None:
    with db.session() as s:
        run = s.get(RetrainRun, run_id)
        assert run is not None
        for k, v in fields.items():
            setattr(run, k, v)
        run.finished_at = utcnow()


def _dataset_name(datasets: Sequence[Path]) -> str:
    return ",".join(["database", *[str(d) for d in datasets]])


def run_nightly(settings: Settings, datasets: Sequence[Path] = (), *, dry_run: bool = False,
                force: bool = False, train_overrides: Mapping[str, Any] | None = None,
                warm_start: bool = True) -> RunOutcome:
    """One nightly run under the lock.  Never raises for a failed run: see ``exit_code``."""
    settings.ensure_dirs()
    try:
        with run_lock(settings.data_dir / "retrain.lock"):
            return _run_locked(settings, list(datasets), dry_run, force,
                               dict(train_overrides or {}), warm_start)
    except LockedError as exc:
        log.warning("retrain skipped: %s", exc)
        return RunOutcome(EXIT_LOCKED, "locked", reasons=[str(exc)])


def _run_locked(settings: Settings, datasets: list[Path], dry_run: bool, force: bool,
                overrides: dict[str, Any], warm_start: bool) -> RunOutcome:
    db = Database(settings)
    champion = production_model(db)
    since = last_completed_run_start(db)
    with db.session() as s:
        row = RetrainRun(status="running", dry_run=dry_run,
                         champion_version=champion.version if champion else None)
        s.add(row)
        s.flush()
        run_id = row.id
    outcome = RunOutcome(EXIT_OK, "running", run_id=run_id,
                         champion=champion.version if champion else None)
    try:
        new_ids = new_label_study_ids(db, since)
        if champion is not None and not force and len(new_ids) < settings.min_new_labels:
            reason = (f"not enough new labels: {len(new_ids)} since the last run, "
                      f"{settings.min_new_labels} needed")
            _finish(db, run_id, status="noop", decision="none", reasons=[reason])
            log.info("retrain no-op run=%d %s", run_id, reason)
            outcome.status, outcome.decision, outcome.reasons = "noop", "none", [reason]
            return outcome
        _train_and_decide(db, settings, datasets, dry_run, overrides, warm_start, champion,
                          new_ids, outcome)
        return outcome
    except Exception as exc:  # a failed run is recorded, never half-applied
        log.exception("retrain failed run=%d", run_id)
        reason = f"{type(exc).__name__}: {exc}"
        _finish(db, run_id, status="failed", decision="none", reasons=[reason])
        outcome.exit_code, outcome.status, outcome.reasons = EXIT_FAILED, "failed", [reason]
        if isinstance(exc, DatasetError | TrainingError):
            outcome.exit_code = EXIT_USAGE if isinstance(exc, DatasetError) else EXIT_FAILED
        return outcome
    finally:
        db.dispose()


def _train_and_decide(db: Database, settings: Settings, datasets: list[Path], dry_run: bool,
                      overrides: dict[str, Any], warm_start: bool, champion: ModelInfo | None,
                      new_ids: set[int], outcome: RunOutcome) -> None:
    assert outcome.run_id is not None
    run_id = outcome.run_id
    t0 = time.perf_counter()
    records, unreadable = drop_unreadable(load_records(db, settings, datasets))
    parts = split_records(records, settings.split_key, settings.split_fractions)
    train, val, test = parts[Split.TRAIN], parts[Split.VALIDATION], parts[Split.TEST]
    outcome.splits = {"train": train, "validation": val, "test": test}
    log.info("retrain data run=%d images=%d train=%d validation=%d test=%d", run_id,
             len(records), len(train), len(val), len(test))
    if not test or len({r.label for r in test}) < 2:
        raise TrainingError("the test patients do not hold both classes; label more studies")
    cfg = TrainConfig.from_settings(settings, **overrides)
    init: LoadedModel | None = None
    if champion is not None:
        init = load_checkpoint(Path(champion.path), expected_sha256=champion.sha256)
    result = train_model(train, val, cfg, init=init if warm_start else None,
                         cache_root=settings.data_dir / "cache" / "features",
                         parent_version=champion.version if champion else None)
    # Champion and challenger on the same test patients, through the full network.
    chal_eval, chal_p = evaluate_records(result.model, result.meta, test,
                                         target_sensitivity=settings.target_sensitivity)
    champ_eval: dict[str, Any] | None = None
    champ_p = None
    if init is not None:
        champ_eval, champ_p = evaluate_records(init.model, init.meta, test,
                                               target_sensitivity=settings.target_sensitivity)
    y = np.array([r.label for r in test])
    promote_ok, reasons = compare(champ_eval, chal_eval, settings)
    below_floor = floor_reasons(chal_eval, settings)
    if below_floor:
        promote_ok = False
        reasons = [f"below the promotion floor: {r}" for r in below_floor] + reasons
    else:
        reasons.append(f"promotion floor met ({floor_summary(settings)})")
    needs_approval = promote_ok and settings.promotion_requires_approval
    outcome.test_summary = metrics_line(chal_eval)
    if unreadable:
        shown = "; ".join(unreadable[:20]) + (" …" if len(unreadable) > 20 else "")
        reasons.append(f"{len(unreadable)} image(s) left out as unreadable: {shown}")
    if champ_p is not None:
        paired = delong_paired(y, champ_p, chal_p)
        if paired["diff"] is not None:
            reasons.append(
                f"paired DeLong AUC difference (challenger - champion) {paired['diff']:+.4f} "
                f"[{paired['ci_low']:+.4f}, {paired['ci_high']:+.4f}], p={paired['p_value']:.3g}"
            )
    when = utcnow()
    version = f"{result.meta.architecture}-{when:%Y%m%d-%H%M%S}-run{run_id}"
    train_studies = sorted({r.study_uid for r in train + val if r.study_uid})
    test_studies = sorted({r.study_uid for r in test if r.study_uid})
    meta = result.meta
    extra = dict(meta.provenance.extra)
    extra.update(datasets=[str(d) for d in datasets], train_study_uids=train_studies,
                 test=describe(test), history=result.history, timings=result.timings)
    meta = replace(meta, version=version, provenance=replace(meta.provenance, extra=extra))
    report_dir = paths.under(settings.reports_dir, f"run-{run_id:05d}-{when:%Y%m%d-%H%M%S}")
    # Drift: the champion on studies labelled since the last run (it never trained on them).
    drift: dict[str, Any] | None = None
    if init is not None and champion is not None and new_ids:
        recent = [r for r in records if r.study_id in new_ids]
        if recent:
            recent_eval, _ = evaluate_records(init.model, init.meta, recent,
                                              target_sensitivity=settings.target_sensitivity)
            drift = drift_summary(_reference_metrics(db, champion.version), recent_eval)
            if not dry_run:
                _record_evaluation(db, champion.version, run_id, "drift", "recent labels",
                                   recent_eval, str(report_dir / "index.html"))
    deployed = deployed_record(db)
    models = []
    if champ_eval is not None and champ_p is not None and champion is not None:
        models.append(ModelScores(f"champion {champion.version}", y, champ_p,
                                  [r.source for r in test], init.meta.threshold if init else 0.5,
                                  champ_eval))
    models.append(ModelScores(f"challenger {version}", y, chal_p, [r.source for r in test],
                              meta.threshold, chal_eval))
    decision = ("needs approval" if needs_approval else "promoted" if promote_ok
                else "held" if below_floor else "kept")
    if dry_run:
        decision = f"dry-run (would be {decision})"
    summary = {"run": run_id, "decision": decision, "champion": champion.version if champion
               else "none", "challenger": version, "images": len(records),
               "train / validation / test images": f"{len(train)} / {len(val)} / {len(test)}",
               "test patients": len({r.patient_key for r in test}),
               "new labels since last run": len(new_ids),
               "images left out as unreadable": len(unreadable),
               "challenger on test (95% intervals)": outcome.test_summary,
               "validation AUC": result.val_metrics.get("auc"),
               "validation pneumonia-pattern AUC": result.val_metrics.get("pneumonia_auc"),
               "pneumonia-pattern threshold": meta.pneumonia_threshold,
               "threshold (validation, target sensitivity "
               f"{settings.target_sensitivity})": meta.threshold,
               "training time (s)": round(time.perf_counter() - t0, 1)}
    index = write_report(report_dir, f"Nightly retrain run {run_id}", models, summary=summary,
                         reasons=reasons, deployed=deployed, drift=drift,
                         notes=["Sources are confounded with labels in public data: read the "
                                "per-source table, not only the overall figures."])
    outcome.report = index
    outcome.challenger = version
    outcome.reasons = reasons
    if dry_run:
        _finish(db, run_id, status="done", decision="none", reasons=reasons,
                report_path=str(index), challenger_version=version)
        outcome.status, outcome.decision = "done", "none"
        return
    path = paths.under(settings.models_dir, f"{version}.pt")
    sha = save_checkpoint(path, result.model, meta)
    reg_meta = {**meta.to_dict(), "parent_version": meta.provenance.parent_version,
                "metrics": {k: chal_eval.get(k) for k in ("auc", "sensitivity", "specificity")},
                "validation": _summary(result.val_metrics), "run_id": run_id}
    register_model(db, path, meta=reg_meta, version=version, sha256=sha)
    _record_evaluation(db, version, run_id, "test", _dataset_name(datasets), chal_eval,
                       str(index), {"test_study_uids": test_studies})
    if champion is not None and champ_eval is not None:
        _record_evaluation(db, champion.version, run_id, "test", _dataset_name(datasets),
                           champ_eval, str(index), {"test_study_uids": test_studies})
    if needs_approval:
        hold(db, version, AWAITING_APPROVAL)
    elif promote_ok:
        promote(db, version)
    elif below_floor:  # stays a candidate, with the reason on the row
        hold(db, version, "; ".join(f"below the promotion floor: {r}" for r in below_floor))
    else:
        reject(db, version, "; ".join(reasons))
    _finish(db, run_id, status="done", decision=decision, reasons=reasons,
            report_path=str(index), challenger_version=version)
    outcome.status, outcome.decision = "done", decision
    log.info("retrain done run=%d challenger=%s decision=%s", run_id, version, decision)


def _reference_metrics(db: Database, version: str) -> dict[str, Any] | None:
    with db.session() as s:
        ev = s.scalar(select(Evaluation).where(
            Evaluation.model_version_id == model_id(db, version), Evaluation.kind == "test"
        ).order_by(Evaluation.id))
        return dict(ev.metrics_json) if ev is not None else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.retrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", action="append", default=[], type=Path,
                   help="labelled folder (labels.csv: path,label,patient_id[,source]); repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="train, evaluate and report, but register and promote nothing")
    p.add_argument("--force", action="store_true", help="run even without enough new labels")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s "
                        "%(message)s")
    for d in args.dataset:
        if not (d / "labels.csv").is_file():
            print(f"error: dataset {d} has no labels.csv", file=sys.stderr)
            return EXIT_USAGE
    outcome = run_nightly(settings, args.dataset, dry_run=args.dry_run, force=args.force)
    text = {"status": outcome.status, "run": outcome.run_id, "decision": outcome.decision,
            "champion": outcome.champion, "challenger": outcome.challenger,
            "test": outcome.test_summary, "reasons": outcome.reasons,
            "report": str(outcome.report) if outcome.report else None}
    if args.json:
        print(json.dumps(text))
    else:
        for key, value in text.items():
            if value in (None, []):
                continue
            if isinstance(value, list):
                print(f"{key}:" + "".join(f"\n  - {item}" for item in value))
            else:
                print(f"{key}: {value}")
    return outcome.exit_code


__all__ = ["EXIT_FAILED", "EXIT_LOCKED", "EXIT_OK", "EXIT_USAGE", "RunOutcome", "compare",
           "main", "run_lock", "run_nightly"]

if __name__ == "__main__":
    sys.exit(main())
