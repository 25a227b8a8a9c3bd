"""Ground truth in: a CSV of study labels, imported idempotently with history.

File format (header row required, UTF-8, comma separated)::

    study_uid,accession_number,label,source,date

- ``study_uid`` or ``accession_number``: at least one; the study must already have been
  received.  Where both are given they must name the same study.
- ``label``: ``1``/``0``, ``covid``/``not-covid``, ``positive``/``negative`` (any case).
- ``source``: the source of truth, e.g. ``RT-PCR`` or ``radiologist`` (required).
- ``date``: when the truth was established, ISO ``YYYY-MM-DD`` (may be empty).

Re-importing the same file changes nothing.  A row whose label, source or date differs
from the study's current label supersedes it: the old row stays with ``current=False``
and ``superseded_at`` set.  Malformed rows and unknown studies are reported by line
number; valid rows in the same file are still imported.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Label, Study, utcnow
from db.session import Database

log = logging.getLogger(__name__)

COLUMNS = ("study_uid", "accession_number", "label", "source", "date")
POSITIVE = frozenset({"1", "covid", "covid-19", "positive", "pos"})
NEGATIVE = frozenset({"0", "not-covid", "not covid", "non-covid", "negative", "neg"})


class LabelFileError(ValueError):
    """The label file as a whole cannot be read (the operator's fault)."""


@dataclass(frozen=True)
class RowError:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class ImportReport:
    """What an import did.  ``failed > 0`` means a non-zero exit for the CLI."""

    path: str
    rows: int = 0
    imported: int = 0
    changed: int = 0
    unchanged: int = 0
    errors: list[RowError] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.errors)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def summary(self) -> str:
        return (
            f"{self.rows} rows: {self.imported} new, {self.changed} changed, "
            f"{self.unchanged} unchanged, {self.failed} failed"
        )


@dataclass(frozen=True)
class _Row:
    line: int
    study_uid: str
    accession: str
    label: int
    source: str
    label_date: str | None


def parse_label(text: str) -> int:
    value = text.strip().lower()
    if value in POSITIVE:
        return 1
    if value in NEGATIVE:
        return 0
    raise ValueError(f"label {text!r} is not one of 1/0, covid/not-covid, positive/negative")


def _parse_row(line: int, raw: dict[str, str | None]) -> _Row:
    def cell(name: str) -> str:
        return (raw.get(name) or "").strip()

    if None in raw:  # csv.DictReader files surplus cells under the None key
        raise ValueError("more cells than header columns")
    study_uid, accession = cell("study_uid"), cell("accession_number")
    if not study_uid and not accession:
        raise ValueError("neither study_uid nor accession_number given")
    if len(study_uid) > 64 or len(accession) > 64:
        raise ValueError("study_uid or accession_number longer than 64 characters")
    label = parse_label(cell("label"))
    source = cell("source")
    if not source:
        raise ValueError("source of truth is empty")
    if len(source) > 64:
        raise ValueError("source of truth longer than 64 characters")
    when = cell("date")
    if when:
        try:
            when = date.fromisoformat(when).isoformat()
        except ValueError as exc:
            raise ValueError(f"date {when!r} is not an ISO date YYYY-MM-DD") from exc
    return _Row(line, study_uid, accession, label, source, when or None)


def _find_study(s: Session, row: _Row) -> Study:
    by_uid = by_acc = None
    if row.study_uid:
        by_uid = s.scalar(select(Study).where(Study.study_uid == row.study_uid))
        if by_uid is None:
            raise LookupError(f"unknown study_uid {row.study_uid}")
    if row.accession:
        found = s.scalars(select(Study).where(Study.accession_number == row.accession)).all()
        if not found:
            raise LookupError(f"unknown accession_number {row.accession}")
        if len(found) > 1 and by_uid is None:
            raise LookupError(f"accession_number {row.accession} matches {len(found)} studies")
        if by_uid is not None and by_uid not in found:
            raise LookupError(
                f"study_uid {row.study_uid} and accession_number {row.accession} disagree"
            )
        by_acc = found[0]
    study = by_uid or by_acc
    assert study is not None
    return study


def _apply(s: Session, study: Study, row: _Row, report: ImportReport) -> None:
    current = s.scalars(
        select(Label).where(Label.study_id == study.id, Label.current.is_(True))
    ).all()
    same = [
        c for c in current
        if (c.label, c.truth_source, c.label_date) == (row.label, row.source, row.label_date)
    ]
    if same and len(current) == 1:
        report.unchanged += 1
        return
    now = utcnow()
    for old in current:
        old.current = False
        old.superseded_at = now
    s.add(Label(study_id=study.id, label=row.label, truth_source=row.source,
                label_date=row.label_date, imported_at=now, current=True))
    if current:
        report.changed += 1
        log.info("label changed study_uid=%s line=%d", study.study_uid, row.line)
    else:
        report.imported += 1


def read_rows(path: Path, report: ImportReport) -> list[_Row]:
    """Parse the file; malformed rows go to ``report.errors`` by line number."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelFileError(f"cannot read label file {path}: {exc}") from exc
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    needed = {"label", "source", "date"}
    if not needed <= set(header) or not {"study_uid", "accession_number"} & set(header):
        raise LabelFileError(
            f"label file {path} must have the header {','.join(COLUMNS)} "
            f"(study_uid or accession_number may be left out); found {','.join(header)}"
        )
    rows: list[_Row] = []
    for raw in reader:
        line = reader.line_num
        if not any((v or "").strip() for k, v in raw.items() if k is not None):
            continue
        report.rows += 1
        try:
            rows.append(_parse_row(line, raw))
        except ValueError as exc:
            report.errors.append(RowError(line, str(exc)))
    return rows


def import_labels(db: Database, path: Path) -> ImportReport:
    """Import a label CSV.  Valid rows are committed even when other rows fail."""
    path = Path(path)
    report = ImportReport(path=str(path))
    rows = read_rows(path, report)
    seen: dict[int, _Row] = {}
    with db.session() as s:
        for row in rows:
            try:
                study = _find_study(s, row)
            except LookupError as exc:
                report.errors.append(RowError(row.line, str(exc)))
                continue
            earlier = seen.get(study.id)
            if earlier is not None:
                if (earlier.label, earlier.source, earlier.label_date) != (
                    row.label, row.source, row.label_date
                ):
                    report.errors.append(RowError(
                        row.line, f"conflicts with line {earlier.line} for the same study"
                    ))
                else:
                    report.unchanged += 1
                continue
            seen[study.id] = row
            _apply(s, study, row, report)
    report.errors.sort(key=lambda e: e.line)
    log.info("labels imported file=%s %s", path.name, report.summary())
    return report


def current_labels(db: Database) -> dict[int, int]:
    """study id -> current label."""
    with db.session() as s:
        rows = s.execute(select(Label.study_id, Label.label).where(Label.current.is_(True)))
        return {int(sid): int(lab) for sid, lab in rows}


__all__ = [
    "COLUMNS",
    "ImportReport",
    "LabelFileError",
    "RowError",
    "current_labels",
    "import_labels",
    "parse_label",
]
