"""Label import: good rows, bad rows by line, re-import, changed labels kept as history."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Label, Study
from db.session import Database
from db.settings import Settings
from trainer.labels import LabelFileError, import_labels


def _studies(db: Database) -> None:
    with db.session() as s:
        s.add(Study(study_uid="1.2.3.1", accession_number="ACC1", patient_id="P1"))
        s.add(Study(study_uid="1.2.3.2", accession_number="ACC2", patient_id="P2"))
        s.add(Study(study_uid="1.2.3.3", accession_number="DUP", patient_id="P3"))
        s.add(Study(study_uid="1.2.3.4", accession_number="DUP", patient_id="P4"))


def _write(path: Path, body: str) -> Path:
    path.write_text("study_uid,accession_number,label,source,date\n" + body)
    return path


def _labels(db: Database) -> list[tuple[str, int, str, str | None, bool]]:
    with db.session() as s:
        rows = s.execute(
            select(Study.study_uid, Label.label, Label.truth_source, Label.label_date,
                   Label.current).join(Study, Study.id == Label.study_id).order_by(Label.id)
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_good_rows_import_and_reimport_is_idempotent(settings: Settings, tmp_path: Path) -> None:
    db = Database(settings)
    _studies(db)
    f = _write(tmp_path / "l.csv",
               "1.2.3.1,,covid,RT-PCR,2024-01-02\n,ACC2,0,radiologist,\n"
               "1.2.3.3,DUP,Not-COVID,RT-PCR,2024-02-01\n")
    report = import_labels(db, f)
    assert (report.rows, report.imported, report.failed) == (3, 3, 0)
    assert report.exit_code == 0
    again = import_labels(db, f)
    assert (again.imported, again.changed, again.unchanged, again.failed) == (0, 0, 3, 0)
    assert _labels(db) == [
        ("1.2.3.1", 1, "RT-PCR", "2024-01-02", True),
        ("1.2.3.2", 0, "radiologist", None, True),
        ("1.2.3.3", 0, "RT-PCR", "2024-02-01", True),
    ]
    db.dispose()


def test_bad_rows_are_reported_by_line_and_good_rows_still_imported(
    settings: Settings, tmp_path: Path
) -> None:
    db = Database(settings)
    _studies(db)
    f = _write(tmp_path / "l.csv", "\n".join([
        "1.2.3.1,,1,RT-PCR,2024-01-02",   # line 2 ok
        "9.9.9,,1,RT-PCR,2024-01-02",     # 3 unknown study
        "1.2.3.2,,maybe,RT-PCR,",         # 4 bad label
        ",,1,RT-PCR,",                    # 5 no key
        "1.2.3.2,,0,,",                   # 6 no source
        "1.2.3.2,,0,RT-PCR,02/01/2024",   # 7 bad date
        ",DUP,1,RT-PCR,",                 # 8 ambiguous accession
        "1.2.3.1,ACC2,1,RT-PCR,",         # 9 keys disagree
        "1.2.3.1,,0,RT-PCR,2024-01-02",   # 10 conflicts with line 2
        "1.2.3.2,,0,RT-PCR,,extra",       # 11 too many cells
        "1.2.3.2,,0,RT-PCR,2024-03-03",   # 12 ok
    ]) + "\n")
    report = import_labels(db, f)
    assert report.imported == 2
    assert [e.line for e in report.errors] == [3, 4, 5, 6, 7, 8, 9, 10, 11]
    reasons = {e.line: e.reason for e in report.errors}
    assert "unknown study_uid" in reasons[3]
    assert "label" in reasons[4]
    assert "matches 2 studies" in reasons[8]
    assert "disagree" in reasons[9]
    assert "conflicts with line 2" in reasons[10]
    assert report.failed == 9 and report.exit_code != 0
    assert {r[0] for r in _labels(db)} == {"1.2.3.1", "1.2.3.2"}
    db.dispose()


def test_changed_label_supersedes_and_keeps_history(settings: Settings, tmp_path: Path) -> None:
    db = Database(settings)
    _studies(db)
    import_labels(db, _write(tmp_path / "a.csv", "1.2.3.1,,0,radiologist,2024-01-01\n"))
    report = import_labels(db, _write(tmp_path / "b.csv", "1.2.3.1,,1,RT-PCR,2024-01-05\n"))
    assert (report.changed, report.imported, report.failed) == (1, 0, 0)
    rows = _labels(db)
    assert rows == [
        ("1.2.3.1", 0, "radiologist", "2024-01-01", False),
        ("1.2.3.1", 1, "RT-PCR", "2024-01-05", True),
    ]
    with db.session() as s:
        old = s.scalars(select(Label).where(Label.current.is_(False))).one()
        assert old.superseded_at is not None
    db.dispose()


def test_file_without_required_header_is_refused(settings: Settings, tmp_path: Path) -> None:
    db = Database(settings)
    bad = tmp_path / "bad.csv"
    bad.write_text("uid,value\n1.2.3.1,1\n")
    with pytest.raises(LabelFileError, match="header"):
        import_labels(db, bad)
    db.dispose()


# ----- hostile and large label files ------------------------------------------------
@pytest.fixture
def db(settings: Settings):  # type: ignore[no-untyped-def]
    database = Database(settings)
    yield database
    database.dispose()


def _many(db: Database, n: int) -> None:
    with db.session() as s:
        for i in range(1, n + 1):
            s.add(Study(study_uid=f"1.2.3.{i}", accession_number=f"A{i}"))

def test_control_characters_reject_only_their_line(db: Database, tmp_path: Path) -> None:
    _many(db, 3)
    f = tmp_path / "ctl.csv"
    f.write_text(
        "study_uid,accession_number,label,source,date\n"
        "1.2.3.1,,1,RT-PCR,2024-01-02\n"
        "1.2.3.2,,1,RT\x00PCR,2024-01-02\n"
        '1.2.3.3,,0,"radio\x0blogist",2024-01-02\n', encoding="utf-8")
    report = import_labels(db, f)
    assert report.imported == 1
    assert [(e.line, "U+0000" in e.reason or "U+000B" in e.reason) for e in report.errors] \
        == [(3, True), (4, True)]


def test_line_numbers_are_csv_record_numbers(db: Database, tmp_path: Path) -> None:
    _many(db, 3)
    f = tmp_path / "records.csv"
    f.write_text(
        "study_uid,accession_number,label,source,date\n"
        '1.2.3.1,,1,"RT-PCR\u2028see\x0bnote",2024-01-02\n'
        '1.2.3.2,,1,"multi\nline source",2024-01-02\n'
        "1.2.3.3,,maybe,RT-PCR,2024-01-02\n", encoding="utf-8")
    report = import_labels(db, f)
    lines = {e.line for e in report.errors}
    assert 4 in lines and "maybe" in next(e.reason for e in report.errors if e.line == 4)
    assert 2 in lines  # the U+2028 record is rejected as itself, not as two lines


def test_a_large_import_commits_in_batches(db: Database, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import labels as labels_module

    _many(db, 9)
    monkeypatch.setattr(labels_module, "BATCH_ROWS", 4)
    commits = []
    real_session = db.session

    def counting_session():  # type: ignore[no-untyped-def]
        commits.append(1)
        return real_session()

    monkeypatch.setattr(db, "session", counting_session)
    f = tmp_path / "big.csv"
    f.write_text("study_uid,accession_number,label,source,date\n" + "".join(
        f"1.2.3.{i},,1,RT-PCR,2024-01-02\n" for i in range(1, 10)))
    report = import_labels(db, f)
    assert report.imported == 9 and len(commits) == 3  # 4 + 4 + 1


def test_concurrent_imports_wait_for_each_other(db: Database, tmp_path: Path) -> None:
    import threading

    from trainer.labels import import_lock

    _many(db, 2)
    f = tmp_path / "one.csv"
    f.write_text("study_uid,accession_number,label,source,date\n1.2.3.1,,1,RT-PCR,2024-01-02\n")
    heard: list[str] = []
    done = threading.Event()
    with import_lock(db):
        worker = threading.Thread(
            target=lambda: (import_labels(db, f, waiting=heard.append), done.set()))
        worker.start()
        assert not done.wait(1.0)  # held off while the first import runs
    worker.join(30)
    assert done.is_set()
    assert heard == ["another labels import is running; waiting for it to finish"]
