"""Checks of a received instance's header at the C-STORE boundary, before anything is kept.

The handler calls :func:`validate` after :func:`dicom_node.ingest.parse_header`.  Each
refusal names its DICOM status and a reason for the log line; nothing is written for a
refused instance.
"""

from __future__ import annotations

import dataclasses

from db.errors import BadInputError
from db.uids import InvalidUidError, parse_uid
from dicom_node.ingest import Header

STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


class RefusedInstanceError(BadInputError):
    """The sender's instance is refused with ``status`` (the sender's fault)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def validate(header: Header, context_sop_class: str) -> Header:
    """``header`` with its UIDs validated (trailing padding stripped), or
    :class:`RefusedInstanceError`: 0xC000 for an invalid UID, 0xA900 where the data set's
    SOP Class UID is not the presentation context's abstract syntax."""
    try:
        study = parse_uid(header.study_uid or None, "StudyInstanceUID")
        sop = parse_uid(header.sop_uid or None, "SOPInstanceUID")
        sop_class = parse_uid(header.sop_class_uid or None, "SOPClassUID")
        series = (None if header.series_uid is None
                  else parse_uid(header.series_uid, "SeriesInstanceUID"))
    except InvalidUidError as exc:
        raise RefusedInstanceError(STATUS_CANNOT_UNDERSTAND, str(exc)) from exc
    context = str(context_sop_class).rstrip("\x00 ")
    if sop_class != context:
        raise RefusedInstanceError(
            STATUS_SOP_CLASS_MISMATCH,
            f"SOPClassUID {sop_class} does not match the presentation context {context}")
    return dataclasses.replace(header, study_uid=study, series_uid=series, sop_uid=sop,
                               sop_class_uid=sop_class)


__all__ = ["RefusedInstanceError", "STATUS_SOP_CLASS_MISMATCH", "validate"]
