"""One validated UID type for every UID that arrives from the network.

The DICOM UI value representation (PS3.5 9.1): components of digits separated by dots,
at most 64 characters, no empty component.  Values are padded to an even length with a
NUL (and some senders pad with spaces), so trailing NUL and space are stripped first.
Components with a leading zero are not allowed by the standard, but old modalities send
them; they are accepted and logged, because refusing them would refuse real studies.

A :class:`Uid` is a ``str`` that has passed :func:`parse_uid`; nothing downstream needs to
validate it again, and nothing truncates it.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

MAX_UID_LENGTH = 64
_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")


class InvalidUidError(ValueError):
    """A UID from the sender does not follow the DICOM UI grammar (the sender's fault)."""


class Uid(str):
    """A string known to follow the DICOM UI grammar."""

    __slots__ = ()


def parse_uid(raw: object, field: str = "UID") -> Uid:
    """``raw`` as a :class:`Uid`, or :class:`InvalidUidError` naming ``field`` and why."""
    if raw is None:
        raise InvalidUidError(f"{field} is missing")
    text = str(raw).rstrip("\x00 ")
    if not text:
        raise InvalidUidError(f"{field} is empty")
    if len(text) > MAX_UID_LENGTH:
        raise InvalidUidError(f"{field} is {len(text)} characters long (at most 64)")
    if not _UID_RE.fullmatch(text):
        raise InvalidUidError(f"{field} {text[:80]!r} is not digits separated by dots")
    if any(len(part) > 1 and part.startswith("0") for part in text.split(".")):
        log.info("accepting %s with a leading-zero component uid=%s", field, text)
    return Uid(text)


def is_valid_uid(raw: object) -> bool:
    """True where :func:`parse_uid` would accept ``raw`` (does not log)."""
    if raw is None:
        return False
    text = str(raw).rstrip("\x00 ")
    return 0 < len(text) <= MAX_UID_LENGTH and _UID_RE.fullmatch(text) is not None


__all__ = ["MAX_UID_LENGTH", "InvalidUidError", "Uid", "is_valid_uid", "parse_uid"]
