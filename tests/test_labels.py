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
