"""The schema migrates and enforces its invariants on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from db.models import Instance, Study, StudyState
from db.session import Database
from db.settings import Destination, Settings, SettingsError, load_settings


def test_migrations_create_every_table(settings: Settings) -> None:
    db = Database(settings)
    tables = set(inspect(db.engine).get_table_names())
    assert {
        "studies", "instances", "analyses", "predictions", "labels", "model_versions",
        "evaluations", "retrain_runs", "deliveries", "alembic_version",
    } <= tables
    Database(settings).dispose()  # a second start-up finds nothing to migrate
    db.dispose()


def test_sop_instance_uid_is_unique(settings: Settings) -> None:
    db = Database(settings)
    with db.session() as s:
        study = Study(study_uid="1.2.3")
        s.add(study)
        s.flush()
        s.add(Instance(study_id=study.id, sop_instance_uid="1.2.3.4", sop_class_uid="1.2",
                       transfer_syntax="1.2.840.10008.1.2.1", path="a", size_bytes=1))
    with pytest.raises(IntegrityError), db.session() as s:
        s.add(Instance(study_id=study.id, sop_instance_uid="1.2.3.4", sop_class_uid="1.2",
                       transfer_syntax="1.2.840.10008.1.2.1", path="b", size_bytes=1))
    with db.session() as s:
        assert s.scalar(select(Study.state)) == StudyState.RECEIVING
    db.dispose()


def _write_studies(url: str, prefix: str) -> None:
    s = load_settings(env={}, overrides={"database_url": url, "data_dir": "/tmp"})
    db = Database(s, migrate=False)
    for i in range(50):
        with db.session() as session:
            session.add(Study(study_uid=f"{prefix}.{i}"))
    db.dispose()


def test_sqlite_is_safe_for_several_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'multi.db'}"
    s = load_settings(env={}, overrides={"database_url": url, "data_dir": str(tmp_path)})
    Database(s).dispose()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_studies, args=(url, f"1.{p}")) for p in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    db = Database(s)
    with db.session() as session:
        assert len(session.scalars(select(Study)).all()) == 150
        mode = session.connection().exec_driver_sql("PRAGMA journal_mode").scalar()
    db.dispose()
    assert mode == "wal"


def test_settings_from_environment_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "cxr.toml"
    cfg.write_text('ae_title = "FROMFILE"\nport = 4242\n')
    s = load_settings(env={
        "CXR_CONFIG": str(cfg), "CXR_PORT": "5555", "CXR_ALLOWED_CALLERS": "A, B",
        "CXR_PACS": "PACS@10.0.0.1:104,ARCH@host:11112", "CXR_STABLE_SECONDS": "2.5",
    })
    assert s.ae_title == "FROMFILE"
    assert s.port == 5555  # the environment beats the file
    assert s.allowed_callers == ("A", "B")
    assert s.pacs == (Destination("PACS", "10.0.0.1", 104), Destination("ARCH", "host", 11112))
    assert s.stable_seconds == 2.5
    assert load_settings(env={}, overrides={"port": 7}, base=s).port == 7


@pytest.mark.parametrize("env", [
    {"CXR_NOT_A_SETTING": "1"},
    {"CXR_PORT": "many"},
    {"CXR_PACS": "nohost"},
    {"CXR_HEATMAP_METHOD": "magic"},
    {"CXR_AE_TITLE": "X" * 17},
])
def test_bad_settings_are_the_operators_fault(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        load_settings(env=env)


def test_default_database_is_sqlite_under_data_dir(tmp_path: Path) -> None:
    s = load_settings(env={"CXR_DATA_DIR": str(tmp_path)})
    assert s.effective_database_url == f"sqlite:///{tmp_path.resolve()}/cxr-triage.db"
    assert s.uses_embedded_broker


def test_database_errors_never_carry_patient_identifiers(settings: Settings) -> None:
    """Error texts end up in log lines; the statement's parameters must not be in them."""
    db = Database(settings)
    with db.session() as s:
        s.add(Study(study_uid="1.2.9", patient_id="MRN-SECRET-42", accession_number="ACC-7"))
    with pytest.raises(IntegrityError) as caught, db.session() as s:
        s.add(Study(study_uid="1.2.9", patient_id="MRN-SECRET-42", accession_number="ACC-7"))
    assert "MRN-SECRET-42" not in str(caught.value)
    assert "ACC-7" not in str(caught.value)
    db.dispose()
