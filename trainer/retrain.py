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

The steps live in :mod:`trainer.retrain_steps` (gather -> train -> evaluate -> decide ->
publish).  The champion changes only in the publish transaction, which also registers the
challenger, records the run's evaluations and marks the run done, so a crash at any step
leaves the champion untouched and never a promoted model beside a run left ``running``;
the run row then says ``failed`` with the error.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db import paths
from db.logs import configure_logging
from db.models import RetrainRun, utcnow
from db.session import Database
from db.settings import Settings, SettingsError, load_settings
from trainer import retrain_steps as steps
from trainer.datasets import DatasetError, ImageRecord
from trainer.drift import last_completed_run_start, new_label_study_ids
from trainer.promotion import metrics_line
from trainer.registry import ModelInfo, production_model
from trainer.retrain_steps import compare
from trainer.train import TrainingError

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


def _finish(db: Database, run_id: int, **fields: Any) -> None:
    with db.session() as s:
        steps.finish(s, run_id, **fields)


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
    """gather -> train -> evaluate -> decide -> (report) -> publish, one step each."""
    assert outcome.run_id is not None
    run_id = outcome.run_id
    t0 = time.perf_counter()
    gathered = steps.gather(db, settings, datasets)
    outcome.splits = {"train": gathered.train, "validation": gathered.validation,
                      "test": gathered.test}
    log.info("retrain data run=%d images=%d train=%d validation=%d test=%d", run_id,
             len(gathered.records), len(gathered.train), len(gathered.validation),
             len(gathered.test))
    steps.require_both_classes(gathered)
    result, init = steps.train(settings, gathered, overrides, warm_start, champion)
    ev = steps.evaluate(settings, gathered, result, init)
    decision = steps.decide(settings, ev, gathered.unreadable, dry_run)
    outcome.test_summary = metrics_line(ev.challenger)
    when = utcnow()
    version = f"{result.meta.architecture}-{when:%Y%m%d-%H%M%S}-run{run_id}"
    meta = steps.challenger_meta(result, version, datasets, gathered)
    report_dir = paths.under(settings.reports_dir, f"run-{run_id:05d}-{when:%Y%m%d-%H%M%S}")
    drift_out, drift_metrics = steps.drift(db, settings, gathered, init, champion, new_ids)
    summary = steps.summary_table(settings, run_id, champion, version, gathered, new_ids,
                                  result, meta, decision, outcome.test_summary, t0)
    index = steps.report(db, settings, run_id, report_dir, champion, init, gathered, ev,
                         decision, version, meta, summary, drift_out)
    outcome.report, outcome.challenger, outcome.reasons = index, version, decision.reasons
    if dry_run:
        with db.session() as s:
            steps.finish(s, run_id, status="done", decision="none", reasons=decision.reasons,
                         report_path=str(index), challenger_version=version)
        outcome.status, outcome.decision = "done", "none"
        return
    test_uids = sorted({r.study_uid for r in gathered.test if r.study_uid})
    steps.publish(db, settings, run_id, result, champion, ev, steps.Publication(
        version=version, meta=meta, report_index=index, decision=decision,
        dataset_name=_dataset_name(datasets), test_study_uids=test_uids,
        drift_metrics=drift_metrics, drift_report=str(report_dir / "index.html")))
    outcome.status, outcome.decision = "done", decision.name
    log.info("retrain done run=%d challenger=%s decision=%s", run_id, version, decision.name)


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
    configure_logging(settings.log_level)
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
