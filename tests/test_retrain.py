"""The nightly run: bootstrap, promotion gating both ways, no-op, lock, report, records."""

from __future__ import annotations

import csv
import fcntl
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Evaluation, ModelStage, ModelVersion, RetrainRun
from db.session import Database
from db.settings import Settings
from tests.support.trainer_synthetic import write_folder
from trainer.registry import list_models, production_model
from trainer.retrain import EXIT_LOCKED, EXIT_OK, main, run_lock, run_nightly
from trainer.splits import Split, assign_split

TINY = {"input_size": 64, "epochs": 3, "batch_size": 16}
FAST = {"head_epochs": 3, "views": 2, "contrast": "none"}


def _tiny(make_settings, database_url: str) -> Settings:  # type: ignore[no-untyped-def]
    return make_settings(database_url=database_url, min_new_labels=5,  # type: ignore[no-any-return]
                         split_fractions=(0.5, 0.25, 0.25), **TINY)


def _shuffle_training_labels(root: Path, s: Settings) -> None:
    """Random labels for train/validation patients; test patients keep their true labels."""
    with (root / "labels.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    import random

    rng = random.Random(7)
    for r in rows:
        if assign_split(r["patient_id"], s.split_key, s.split_fractions) != Split.TEST:
            r["label"] = str(rng.randint(0, 1))
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.slow
def test_bootstrap_then_better_promoted_then_worse_kept(  # type: ignore[no-untyped-def]
    make_settings, database_url: str, tmp_path: Path
) -> None:
    s = _tiny(make_settings, database_url)
    weak = write_folder(tmp_path / "weak", n_patients=48, signal=0.12, seed=1)
    strong = write_folder(tmp_path / "strong", n_patients=64, signal=1.0, seed=2)

    first = run_nightly(s, [weak], train_overrides=FAST)
    assert first.exit_code == EXIT_OK and first.decision == "promoted"
    assert first.reasons[0].startswith("no production model")
    db = Database(s)
    assert production_model(db) is not None
    assert production_model(db).version == first.challenger  # type: ignore[union-attr]

    better = run_nightly(s, [strong], force=True, train_overrides=FAST)
    assert better.decision == "promoted", better.reasons
    assert production_model(db).version == better.challenger  # type: ignore[union-attr]

    _shuffle_training_labels(strong, s)
    worse = run_nightly(s, [strong], force=True, train_overrides=FAST, warm_start=False)
    assert worse.decision == "kept", worse.reasons
    assert any("below the champion" in r for r in worse.reasons)
    assert production_model(db).version == better.challenger  # type: ignore[union-attr]

    stages = {m.version: m.stage for m in list_models(db)}
    assert stages == {first.challenger: ModelStage.RETIRED, better.challenger:
                      ModelStage.PRODUCTION, worse.challenger: ModelStage.REJECTED}
    with db.session() as session:
        runs = session.scalars(select(RetrainRun).order_by(RetrainRun.id)).all()
        assert [r.decision for r in runs] == ["promoted", "promoted", "kept"]
        assert all(r.reasons and r.report_path for r in runs)
        evals = session.scalars(select(Evaluation).where(Evaluation.kind == "test")).all()
        assert len(evals) == 5  # challenger each run, champion in runs 2 and 3
        assert all(e.metrics_json["per_source"] for e in evals)
        for row in session.scalars(select(ModelVersion)):
            assert Path(row.path).is_file() and len(row.sha256) == 64
    report = Path(runs[2].report_path)  # type: ignore[arg-type]
    assert report.is_file() and "below the champion" in report.read_text()
    assert (report.parent / "roc.png").stat().st_size > 1000
    assert len(list(report.parent.glob("hist-source-*.png"))) == 2
    db.dispose()


def test_not_enough_new_labels_is_a_clean_noop_and_the_lock_excludes(  # type: ignore[no-untyped-def]
    make_settings, sqlite_url: str, tmp_path: Path
) -> None:
    s = make_settings(database_url=sqlite_url, min_new_labels=5)
    db = Database(s)
    from tests.support.trainer_db import fake_production_model

    fake_production_model(db, tmp_path)
    out = run_nightly(s)
    assert out.exit_code == EXIT_OK and out.status == "noop"
    assert "not enough new labels: 0" in out.reasons[0]
    with db.session() as session:
        run = session.scalars(select(RetrainRun)).one()
        assert (run.status, run.decision) == ("noop", "none")
    # a second run while the lock is held exits 3 without touching the database
    fd = os.open(s.data_dir / "retrain.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert run_nightly(s).exit_code == EXIT_LOCKED
    finally:
        os.close(fd)
    with run_lock(s.data_dir / "retrain.lock"):
        pass  # released again
    db.dispose()


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    assert main(["--bogus"]) == 2
    assert main(["--dataset", str(tmp_path)]) == 2  # no labels.csv


@pytest.mark.slow
def test_nightly_trains_on_received_studies_labelled_through_import(  # type: ignore[no-untyped-def]
    make_settings, database_url: str, tmp_path: Path
) -> None:
    """Studies spooled and recorded as the listener does, labelled with the CSV import; no
    test patient's study is ever used in training.  (The end-to-end test through the real
    listener belongs with the listener's tests.)"""
    from tests.support.trainer_db import spool_study
    from trainer.labels import import_labels

    s = _tiny(make_settings, database_url)
    db = Database(s)
    lines = ["study_uid,accession_number,label,source,date"]
    for p in range(64):  # enough test patients for a steady AUC
        positive = p % 2 == 0
        for k in range(1 + p % 2):  # some patients have two studies
            uid = spool_study(db, s, patient_id=f"MRN{p:04d}", positive=positive,
                              seed=100 * p + k)
            lines.append(f"{uid},,{'covid' if positive else 'not-covid'},RT-PCR,2024-03-01")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    assert import_labels(db, tmp_path / "labels.csv").failed == 0

    out = run_nightly(s, train_overrides=FAST)
    assert out.exit_code == EXIT_OK and out.decision == "promoted", out.reasons
    train_keys = {r.patient_key for r in out.splits["train"] + out.splits["validation"]}
    test_keys = {r.patient_key for r in out.splits["test"]}
    assert test_keys and not train_keys & test_keys
    with db.session() as session:
        model = session.scalars(select(ModelVersion)).one()
        trained_on = set(model.metadata_json["provenance"]["extra"]["train_study_uids"])
        ev = session.scalars(select(Evaluation).where(Evaluation.kind == "test")).one()
        tested_on = set(ev.metrics_json["test_study_uids"])
        assert tested_on and trained_on and not trained_on & tested_on
        assert set(ev.metrics_json["per_source"]) == {"pacs:STORESCU"}
        assert ev.auc is not None and ev.auc > 0.8
    db.dispose()


@pytest.mark.slow
def test_a_crash_mid_run_leaves_the_champion_untouched(  # type: ignore[no-untyped-def]
    make_settings, sqlite_url: str, tmp_path: Path
) -> None:
    """The champion's file is damaged on disk: the run stops when it checks the hash, is
    recorded as failed with the reason, and production stays as it was."""
    from tests.support.trainer_db import fake_production_model

    s = _tiny(make_settings, sqlite_url)
    db = Database(s)
    champion = fake_production_model(db, tmp_path)
    champion_path = Path(production_model(db).path)  # type: ignore[union-attr]
    with open(champion_path, "ab") as f:
        f.write(b"bit rot")
    data = write_folder(tmp_path / "ds", n_patients=40, seed=3)
    out = run_nightly(s, [data], force=True, train_overrides=FAST)
    assert out.exit_code == 1 and out.status == "failed"
    assert "sha256" in out.reasons[0].lower() or "checksum" in out.reasons[0].lower()
    assert production_model(db).version == champion  # type: ignore[union-attr]
    assert [m.version for m in list_models(db)] == [champion]
    with db.session() as session:
        run = session.scalars(select(RetrainRun)).one()
        assert run.status == "failed" and run.finished_at is not None
    db.dispose()


@pytest.mark.slow
def test_an_unreadable_image_is_left_out_and_reported(  # type: ignore[no-untyped-def]
    make_settings, sqlite_url: str, tmp_path: Path
) -> None:
    """One damaged file must not stop every later night's training."""
    s = _tiny(make_settings, sqlite_url)
    data = write_folder(tmp_path / "ds", n_patients=40, seed=3)
    (data / "images" / "synthetic-p0-0.png").write_bytes(b"not an image at all")
    out = run_nightly(s, [data], force=True, train_overrides=FAST)
    assert out.exit_code == EXIT_OK and out.decision == "promoted", out.reasons
    left_out = [r for r in out.reasons if "left out as unreadable" in r]
    assert len(left_out) == 1 and "synthetic-p0-0.png" in left_out[0]
    used = {r.key for part in out.splits.values() for r in part}
    assert not any("synthetic-p0-0.png" in key for key in used)
    assert out.report is not None and "synthetic-p0-0.png" in Path(out.report).read_text()


@pytest.mark.slow
def test_dry_run_trains_and_reports_but_changes_nothing(  # type: ignore[no-untyped-def]
    make_settings, sqlite_url: str, tmp_path: Path
) -> None:
    s = _tiny(make_settings, sqlite_url)
    data = write_folder(tmp_path / "ds", n_patients=40, seed=5)
    first = run_nightly(s, [data], train_overrides=FAST)
    assert first.exit_code == EXIT_OK and first.decision == "promoted"
    db = Database(s)
    champion = production_model(db).version  # type: ignore[union-attr]
    model_files = sorted(p.name for p in s.models_dir.iterdir())

    dry = run_nightly(s, [data], dry_run=True, force=True, train_overrides=FAST)
    assert dry.exit_code == EXIT_OK and dry.status == "done" and dry.decision == "none"
    assert dry.report is not None and Path(dry.report).is_file()
    assert production_model(db).version == champion  # type: ignore[union-attr]
    assert [m.version for m in list_models(db)] == [champion]
    assert sorted(p.name for p in s.models_dir.iterdir()) == model_files
    with db.session() as session:
        runs = session.scalars(select(RetrainRun).order_by(RetrainRun.id)).all()
        assert [(r.dry_run, r.status) for r in runs] == [(False, "done"), (True, "done")]
        assert session.scalars(select(Evaluation).where(Evaluation.run_id == runs[1].id)
                               ).all() == []
    db.dispose()
