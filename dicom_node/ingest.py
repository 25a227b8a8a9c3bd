"""From received bytes to a spool file and an instance row.

The C-STORE handler calls :func:`parse_header` (the few attributes we index, read without
touching pixel data), then :func:`ingest` (durable write, then one short transaction that
adds the instance and upserts its study).  Success is reported only after both.
"""

from __future__ import annotations

import logging
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from db import lifecycle
from db.errors import BadInputError, TransientError
from db.models import Instance, Study, StudyState, utcnow
from db.session import Database
from dicom_node import spool
from dicom_node.view_reader import ViewReader

log = logging.getLogger(__name__)

PIXEL_DATA = 0x7FE00010
_ITEM = 0xFFFEE000
_SEQ_DELIM = 0xFFFEE0DD
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


class UnreadableDatasetError(BadInputError):
    """The received data set is truncated, malformed or lacks the UIDs we index by."""


class RecordError(TransientError):
    """The database could not record the instance (unreachable, read-only, locked)."""


@dataclass(frozen=True)
class Header:
    """The attributes of one received instance that the database indexes."""

    study_uid: str
    series_uid: str | None
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str | None
    view_position: str | None
    body_part: str | None
    patient_id: str | None
    accession_number: str | None


def _stop_at_pixels(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return int(tag) >= PIXEL_DATA


def _text(ds: Dataset, keyword: str, limit: int | None) -> str | None:
    """An indexed text attribute; UIDs (``limit=None``) are never cut: an over-long UID is
    refused by :mod:`dicom_node.store_checks`, never merged with another."""
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00")
    return (text if limit is None else text[:limit]) or None


def _check_tail(data: memoryview, offset: int, implicit: bool, little: bool) -> None:
    """Walk the top-level elements after the header up to the end, without reading values.

    Raises :class:`UnreadableDatasetError` when an element runs past the end: the cheap way
    to notice a truncated transfer without decoding pixel data.
    """
    end = len(data)
    order = "<" if little else ">"
    while offset < end:
        if end - offset < 8:
            raise UnreadableDatasetError(f"dataset truncated at byte {offset}")
        group, elem = struct.unpack_from(order + "HH", data, offset)
        tag = (group << 16) | elem
        vr = bytes(data[offset + 4:offset + 6])
        if implicit or tag in (_ITEM, _SEQ_DELIM) or not vr.isalpha():
            (length,) = struct.unpack_from(order + "I", data, offset + 4)
            offset += 8
        elif vr in _LONG_VRS:
            if end - offset < 12:
                raise UnreadableDatasetError(f"dataset truncated at byte {offset}")
            (length,) = struct.unpack_from(order + "I", data, offset + 8)
            offset += 12
        else:
            (length,) = struct.unpack_from(order + "H", data, offset + 6)
            offset += 8
        if length == 0xFFFFFFFF:
            offset = _skip_undefined(data, offset, order)
        else:
            offset += length
        if offset > end:
            raise UnreadableDatasetError(f"element {tag:08X} runs past the end of the dataset")


def _skip_undefined(data: memoryview, offset: int, order: str) -> int:
    """Skip encapsulated items up to their sequence delimiter; return the offset after it."""
    end = len(data)
    while True:
        if end - offset < 8:
            raise UnreadableDatasetError("encapsulated data ends without a sequence delimiter")
        group, elem, length = struct.unpack_from(order + "HHI", data, offset)
        tag = (group << 16) | elem
        offset += 8
        if tag == _SEQ_DELIM:
            return offset
        if tag != _ITEM or length == 0xFFFFFFFF:
            # Nested undefined lengths only occur in sequences, not in pixel data; a
            # sequence at the top level after Pixel Data is not something we accept.
            raise UnreadableDatasetError(f"unexpected tag {tag:08X} in encapsulated data")
        offset += length
        if offset > end:
            raise UnreadableDatasetError("encapsulated fragment runs past the end of the dataset")


def parse_header(encoded: memoryview | bytes, transfer_syntax: str) -> Header:
    """Read the indexed attributes of a data set encoded in ``transfer_syntax`` (no file meta).

    Stops before Pixel Data and never decodes pixels; checks that the remaining elements fit
    in the received bytes.
    """
    ts = UID(transfer_syntax)
    data = memoryview(encoded)
    try:
        if ts.is_deflated:
            data = memoryview(zlib.decompress(bytes(data), -zlib.MAX_WBITS))
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
        fp = ViewReader(data)  # a BytesIO would copy the whole data set
        ds = read_dataset(cast(BinaryIO, fp), implicit, little, stop_when=_stop_at_pixels,
                          defer_size=4096)
        header_end = fp.tell()
        if header_end > len(data):
            # A long element read with defer_size is skipped by seeking, which never fails.
            raise UnreadableDatasetError(
                f"dataset truncated: an element before Pixel Data ends at byte {header_end} "
                f"of {len(data)}")
        study_uid = _text(ds, "StudyInstanceUID", None)
        sop_uid = _text(ds, "SOPInstanceUID", None)
        sop_class = _text(ds, "SOPClassUID", None)
        header = Header(
            study_uid=study_uid or "",
            series_uid=_text(ds, "SeriesInstanceUID", None),
            sop_uid=sop_uid or "",
            sop_class_uid=sop_class or "",
            transfer_syntax=str(ts),
            modality=_text(ds, "Modality", 16),
            view_position=_text(ds, "ViewPosition", 16),
            body_part=_text(ds, "BodyPartExamined", 64),
            patient_id=_text(ds, "PatientID", 64),
            accession_number=_text(ds, "AccessionNumber", 64),
        )
    except UnreadableDatasetError:
        raise
    except (zlib.error, struct.error, ValueError, TypeError, KeyError, EOFError, OSError,
            NotImplementedError, AttributeError, IndexError, OverflowError) as exc:
        raise UnreadableDatasetError(f"cannot read the data set: {exc}") from exc
    missing = [name for name, value in (("StudyInstanceUID", header.study_uid),
                                        ("SOPInstanceUID", header.sop_uid),
                                        ("SOPClassUID", header.sop_class_uid)) if not value]
    if missing:
        raise UnreadableDatasetError(f"data set lacks {', '.join(missing)}")
    _check_tail(data, header_end, implicit, little)
    return header


def own_object(header: Header) -> bool:
    """Whether the instance is one cxr-triage produced (an SR, SC ... routed back by the
    PACS): its SOP Instance or Series Instance UID carries our UID marker.  Such an
    instance is acknowledged but neither stored nor allowed to re-open its study."""
    from dicom_node.identity import is_own_uid

    return is_own_uid(header.sop_uid) or is_own_uid(header.series_uid)


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to one received instance."""

    instance_id: int
    study_id: int
    duplicate: bool
    path: Path
    study_event: str | None  # "created", "reopened from <state>" or None
    generation: int


class _StripedLocks:
    """Serialise work on one UID across handler threads without one global lock."""

    def __init__(self, n: int = 64) -> None:
        self._locks = [threading.Lock() for _ in range(n)]

    def __call__(self, key: str) -> threading.Lock:
        return self._locks[hash(key) % len(self._locks)]


_study_locks = _StripedLocks()


def _upsert_study(session: Any, header: Header, now: datetime) -> tuple[Study, str | None]:
    study = session.execute(
        select(Study).where(Study.study_uid == header.study_uid).with_for_update()
    ).scalar_one_or_none()
    if study is None:
        study = Study(
            study_uid=header.study_uid,
            state=lifecycle.STUDY_INITIAL,
            patient_id=header.patient_id,
            accession_number=header.accession_number,
            received_at=now,
            updated_at=now,
            last_instance_at=now,
            generation=1,
        )
        session.add(study)
        session.flush()
        return study, "created"
    event: str | None = None
    if study.state != StudyState.RECEIVING:
        event = f"reopened from {lifecycle.reopen_study(study)}"
    if header.patient_id and not study.patient_id:
        study.patient_id = header.patient_id
    if header.accession_number and not study.accession_number:
        study.accession_number = header.accession_number
    study.last_instance_at = now
    study.updated_at = now
    return study, event


def _existing(session: Any, sop_uid: str) -> Instance | None:
    return session.execute(  # type: ignore[no-any-return]
        select(Instance).where(Instance.sop_instance_uid == sop_uid)
    ).scalar_one_or_none()


def ingest(
    db: Database,
    spool_dir: Path,
    header: Header,
    chunks: Sequence[bytes | memoryview],
    calling_ae: str | None,
    min_free_mb: int,
    now: datetime | None = None,
    recorder: Recorder | None = None,
) -> IngestOutcome:
    """Store ``chunks`` (a complete DICOM file) durably, then record it; idempotent per SOP UID.

    Raises :class:`spool.SpoolFullError` / :class:`spool.SpoolWriteError` /
    :class:`RecordError` (all transient); on any of them no file is left behind.
    """
    size = sum(len(c) for c in chunks)
    spool.check_free_space(spool_dir, min_free_mb, size)
    final = spool.instance_path(spool_dir, header.study_uid, header.sop_uid)
    staged = spool.stage(final, chunks)
    return record_staged(db, header, staged, calling_ae, now=now, recorder=recorder)


def record_staged(db: Database, header: Header, staged: spool.StagedFile,
                  calling_ae: str | None, *, now: datetime | None = None,
                  recorder: Recorder | None = None) -> IngestOutcome:
    """Record a staged (written and fsync'ed) file, retrying a conflicting insert; on
    failure nothing of it is left behind (see :func:`ingest`)."""
    for attempt in range(_RECORD_ATTEMPTS):
        try:
            outcome = (recorder or record_one)(db, header, staged, calling_ae, now or utcnow())
            break
        except IntegrityError as exc:
            # Another process recorded the same SOP Instance UID, or created the study,
            # between our read and our commit: look again.
            if attempt + 1 == _RECORD_ATTEMPTS:
                _remove(staged)
                raise RecordError(f"conflict while recording {header.sop_uid}: {exc}") from exc
        except SQLAlchemyError as exc:
            _remove(staged)
            raise RecordError(f"cannot record instance {header.sop_uid}: {exc}") from exc
        except BaseException:
            _remove(staged)
            raise
    if outcome.study_event is not None:
        log.info("study %s %s generation=%d study_id=%d calling_ae=%s", header.study_uid,
                 outcome.study_event, outcome.generation, outcome.study_id, calling_ae)
    return outcome


_RECORD_ATTEMPTS = 3


#: Records one staged store: :func:`record_one`, or a group committer's ``record``.
Recorder = Callable[[Database, Header, spool.StagedFile, "str | None", datetime], IngestOutcome]


def record_one(db: Database, header: Header, staged: spool.StagedFile, calling_ae: str | None,
               when: datetime) -> IngestOutcome:
    """One short transaction: publish the staged file, add the instance, upsert the study."""
    with _study_locks(header.study_uid), db.session() as session:
        return record_in(session, header, staged, calling_ae, when)


def record_in(session: Any, header: Header, staged: spool.StagedFile, calling_ae: str | None,
              when: datetime, *, sync_dir: bool = True) -> IngestOutcome:
    """Publish the staged file and add its rows in ``session`` (committed by the caller).

    A recorded instance always has its file, so the duplicate lookup is only needed when
    the final path already exists (a stat instead of a query on the common path).
    ``sync_dir=False``: the caller fsyncs the file's directory before committing.
    """
    if staged.final.exists() or not staged.temp.exists():
        existing = _existing(session, header.sop_uid)
        if existing is not None:
            staged.discard()
            if staged.created_final and staged.final != Path(existing.path):
                # Published on an earlier try under another study's folder: not a
                # file any row refers to, so it must not stay behind.
                staged.final.unlink(missing_ok=True)
            return IngestOutcome(existing.id, existing.study_id, True, Path(existing.path),
                                 None, 0)
    if staged.temp.exists():
        staged.publish(sync_dir=sync_dir)
    study_id, generation, event = _touch_study(session, header, when)
    instance = Instance(
        study_id=study_id,
        sop_instance_uid=header.sop_uid,
        sop_class_uid=header.sop_class_uid,
        series_uid=header.series_uid,
        transfer_syntax=header.transfer_syntax,
        modality=header.modality,
        view_position=header.view_position,
        body_part=header.body_part,
        path=str(staged.final),
        size_bytes=staged.size,
        sha256=staged.sha256,
        calling_ae=calling_ae,
        received_at=when,
    )
    session.add(instance)
    session.flush()
    return IngestOutcome(instance.id, study_id, False, staged.final, event, generation)


def _touch_study(session: Any, header: Header, when: datetime) -> tuple[int, int, str | None]:
    """Bump a receiving study in one statement; create or re-open it otherwise."""
    row = session.execute(
        update(Study)
        .where(Study.study_uid == header.study_uid, Study.state == StudyState.RECEIVING)
        .values(last_instance_at=when, updated_at=when)
        .returning(Study.id, Study.generation)
    ).first()
    if row is not None:
        return int(row[0]), int(row[1]), None
    study, event = _upsert_study(session, header, when)
    return study.id, study.generation, event


def _remove(staged: spool.StagedFile) -> None:
    """Leave nothing of ours behind for an instance that was not recorded.  A file that was
    at the final path before we published (another process's, possibly acknowledged) is
    left where it is."""
    if staged.temp.exists():
        staged.discard()
    elif staged.created_final:
        staged.final.unlink(missing_ok=True)
    else:
        log.warning("unrecorded instance file left in place sop=%s (present before this store)",
                    staged.final.stem)
