"""Ground truth in: a CSV of study labels, imported idempotently with history.

File format (header row required, UTF-8, comma separated)::

    study_uid,accession_number,label,source,date[,label_name]

- ``study_uid`` or ``accession_number``: at least one; the study must already have been
  received.  Where both are given they must name the same study.
- ``label``: ``1``/``0``, ``covid``/``not-covid``, ``positive``/``negative`` (any case).
- ``label_name`` (optional column): ``normal``, ``other_pneumonia`` or ``covid``.  Where
  given, ``label`` may be empty; where both are given they must agree (covid is 1).  A
  study with only ``label`` 0 is "not COVID-19": it trains the COVID-19 objective of the
  three-class model and not the pneumonia one.
- ``source``: the source of truth, e.g. ``RT-PCR`` or ``radiologist`` (required).
- ``date``: when the truth was established, ISO ``YYYY-MM-DD`` (may be empty).

Re-importing the same file changes nothing.  A row whose label, source or date differs
from the study's current label supersedes it: the old row stays with ``current=False``
and ``superseded_at`` set.  Malformed rows (control characters such as NUL included) and
unknown studies are reported by line, where a line is the CSV record number (the header
is line 1; a quoted cell holding a line break does not shift the numbers); valid rows in
the same file are still imported.

Rows are committed in batches of :data:`BATCH_ROWS`, so a large import never holds the
database (on SQLite, the listener's writes) for long, and imports run one at a time: a
second one waits for the first and says so.
"""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from db.models import Label, Study, utcnow
from db.session import Database

log = logging.getLogger(__name__)

COLUMNS = ("study_uid", "accession_number", "label", "source", "date")
#: Rows per transaction: each commit is short, so ingest never waits long on SQLite.
BATCH_ROWS = 200
#: PostgreSQL advisory lock key that serialises imports across hosts.
_PG_LOCK_KEY = 0x6378_6C61  # "cxla"
_LOCK_FILE = ".labels-import.lock"
POSITIVE = frozenset({"1", "covid", "covid-19", "positive", "pos"})
NEGATIVE = frozenset({"0", "not-covid", "not covid", "non-covid", "negative", "neg"})
LABEL_NAMES = ("normal", "other_pneumonia", "covid")


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
    label_name: str | None = None

    def truth(self) -> tuple[int, str | None, str, str | None]:
        return (self.label, self.label_name, self.source, self.label_date)


def parse_label(text: str) -> int:
    value = text.strip().lower()
    if value in POSITIVE:
        return 1
    if value in NEGATIVE:
        return 0
    raise ValueError(f"label {text!r} is not one of 1/0, covid/not-covid, positive/negative")


def parse_label_name(text: str) -> str | None:
    """``normal``, ``other_pneumonia`` or ``covid`` (any case; ``other-pneumonia`` too);
    None for an empty cell."""
    value = text.strip().lower().replace("-", "_").replace(" ", "_")
    if not value:
        return None
    if value not in LABEL_NAMES:
        raise ValueError(f"label_name {text!r} is not one of {', '.join(LABEL_NAMES)}")
    return value


def reconcile(label: int | None, name: str | None) -> int:
    """The 0/1 COVID-19 label from a label, a label name or both (which must agree)."""
    if name is None:
        if label is None:
            raise ValueError("neither label nor label_name given")
        return label
    implied = int(name == "covid")
    if label is not None and label != implied:
        raise ValueError(f"label {label} disagrees with label_name {name!r}")
    return implied


def _parse_row(line: int, raw: dict[str, str | None]) -> _Row:
    def cell(name: str) -> str:
        return (raw.get(name) or "").strip()

    if None in raw:  # surplus cells are filed under the None key
        raise ValueError("more cells than header columns")
    for column, value in raw.items():
        bad = next((ch for ch in value or "" if _is_control(ch)), None)
        if bad is not None:
            raise ValueError(f"{column} holds the control character U+{ord(bad):04X}")
    study_uid, accession = cell("study_uid"), cell("accession_number")
    if not study_uid and not accession:
        raise ValueError("neither study_uid nor accession_number given")
    if len(study_uid) > 64 or len(accession) > 64:
        raise ValueError("study_uid or accession_number longer than 64 characters")
    name = parse_label_name(cell("label_name"))
    label = reconcile(parse_label(cell("label")) if cell("label") or name is None else None,
                      name)
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
    return _Row(line, study_uid, accession, label, source, when or None, name)


def _is_control(ch: str) -> bool:
    """NUL and other control or separator characters that have no place in a cell."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs")


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
        if (c.label, c.label_name, c.truth_source, c.label_date) == row.truth()
    ]
    if same and len(current) == 1:
        report.unchanged += 1
        return
    now = utcnow()
    for old in current:
        old.current = False
        old.superseded_at = now
    s.add(Label(study_id=study.id, label=row.label, label_name=row.label_name,
                truth_source=row.source, label_date=row.label_date, imported_at=now,
                current=True))
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
    # The csv module, not splitlines(): a \x0b or U+2028 inside a quoted cell is not a
    # line break, and a record's number is its position among the records.
    records = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(records, [])]
    except csv.Error as exc:
        raise LabelFileError(f"label file {path}: {exc}") from exc
    needed = {"source", "date"}
    if (not needed <= set(header) or not {"study_uid", "accession_number"} & set(header)
            or not {"label", "label_name"} & set(header)):
        raise LabelFileError(
            f"label file {path} must have the header {','.join(COLUMNS)} "
            f"(study_uid or accession_number may be left out; label_name may stand for label)"
            f"; found {','.join(header)}"
        )
    rows: list[_Row] = []
    line = 1
    while True:
        line += 1
        try:
            cells = next(records)
        except StopIteration:
            break
        except csv.Error as exc:
            report.rows += 1
            report.errors.append(RowError(line, f"not a CSV record: {exc}"))
            continue
        if not any(c.strip() for c in cells):
            continue
        raw: dict[str | None, str | None] = dict(zip(header, cells, strict=False))
        if len(cells) > len(header):
            raw[None] = ",".join(cells[len(header):])
        report.rows += 1
        try:
            rows.append(_parse_row(line, raw))  # type: ignore[arg-type]
        except ValueError as exc:
            report.errors.append(RowError(line, str(exc)))
    return rows


@contextmanager
def import_lock(db: Database, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """One import at a time: a PostgreSQL advisory lock (across hosts), else a file lock in
    the data dir (SQLite lives there).  ``waiting`` hears, once, that another import runs."""
    message = "another labels import is running; waiting for it to finish"
    if db.engine.dialect.name == "postgresql":
        with db.engine.connect() as conn:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            if not got.scalar():
                (waiting or log.warning)(message)
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
        return
    lock_path = db.settings.data_dir / _LOCK_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            (waiting or log.warning)(message)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def import_labels(db: Database, path: Path,
                  waiting: Callable[[str], None] | None = None) -> ImportReport:
    """Import a label CSV.  Valid rows are committed (in batches) even when other rows
    fail; a concurrent import waits for this one (``waiting`` hears that it does)."""
    path = Path(path)
    report = ImportReport(path=str(path))
    rows = read_rows(path, report)
    seen: dict[int, _Row] = {}
    with import_lock(db, waiting):
        for start in range(0, len(rows), BATCH_ROWS):
            _import_batch(db, rows[start:start + BATCH_ROWS], seen, report)
    report.errors.sort(key=lambda e: e.line)
    log.info("labels imported file=%s %s", path.name, report.summary())
    return report


def _import_batch(db: Database, rows: list[_Row], seen: dict[int, _Row],
                  report: ImportReport) -> None:
    """One short transaction for a batch of rows."""
    with db.session() as s:
        for row in rows:
            try:
                study = _find_study(s, row)
            except LookupError as exc:
                report.errors.append(RowError(row.line, str(exc)))
                continue
            earlier = seen.get(study.id)
            if earlier is not None:
                if earlier.truth() != row.truth():
                    report.errors.append(RowError(
                        row.line, f"conflicts with line {earlier.line} for the same study"
                    ))
                else:
                    report.unchanged += 1
                continue
            seen[study.id] = row
            _apply(s, study, row, report)


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
    "LABEL_NAMES",
    "parse_label",
    "parse_label_name",
    "reconcile",
]
