"""Deterministic identity of our output objects: one UID, one content.

A SOP Instance UID is derived from everything that shapes the object's content: the kind
of object, the source SOP Instance UIDs, the model version and weights hash, and a digest
of the content inputs (:func:`content_digest`: sanitised source headers, pixels, heatmap,
probabilities, threshold, predecessor, institution, builder and library versions). New
content therefore always gets a new UID, and re-building identical content gives the same
UID, so a repeated send is a harmless duplicate that the PACS stores once. The outbox keeps
the first file written under a UID (:func:`dicom_node.results.write_dataset`), so whatever
is sent under a UID is always the same bytes.

UIDs have the form ``2.25.<decimal of a 128-bit UUID>`` (PS3.5 B.2), at most 44 characters.
Every UID we derive carries a marker in the UUID's first 32 bits (the hash part of a
version-5 UUID; version and variant bits are kept), so our own objects are recognised when
a PACS routes them back (:func:`is_own_uid`).
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

# A fixed namespace for every UID cxr-triage derives; changing it changes every UID.
_NAMESPACE = uuid.UUID("8f0c2f4e-3b1d-5a4e-9a57-6c7872747269")

SR = "sr"
SC = "sc"
NOT_ANALYSED_SR = "sr-not-analysed"
GSPS = "gsps"
KOS = "kos"
_KINDS = (SR, SC, NOT_ANALYSED_SR, GSPS, KOS)


# "cxrt": the first 32 bits of every UUID we derive.
_MARKER = 0x63787274
_MARKER_SHIFT = 96
_UID_PREFIX = "2.25."


def uid_from(*parts: str) -> str:
    """A ``2.25`` UID from a UUID5 of the joined parts (order matters), with our marker."""
    name = "\x1f".join(parts)
    value = uuid.uuid5(_NAMESPACE, name).int
    value = (value & ((1 << _MARKER_SHIFT) - 1)) | (_MARKER << _MARKER_SHIFT)
    return f"{_UID_PREFIX}{value}"


def is_own_uid(uid: str | None) -> bool:
    """Whether ``uid`` is one that cxr-triage derived (see :func:`uid_from`).

    A foreign ``2.25`` UID matches by chance with probability 2**-32.
    """
    if not uid or not uid.startswith(_UID_PREFIX):
        return False
    digits = uid[len(_UID_PREFIX):]
    if not digits.isdigit() or len(digits) > 39:
        return False
    return int(digits) >> _MARKER_SHIFT == _MARKER


def _feed(h: Any, part: object) -> None:
    """Feed one content input into ``h`` unambiguously (type tag, length, bytes)."""
    if part is None:
        h.update(b"N")
    elif isinstance(part, bool):
        h.update(b"B1" if part else b"B0")
    elif isinstance(part, int | float):
        h.update(b"F" + struct.pack(">d", float(part)))
    elif isinstance(part, str):
        data = part.encode("utf-8", "surrogatepass")
        h.update(b"S" + struct.pack(">Q", len(data)) + data)
    elif isinstance(part, bytes | bytearray | memoryview):
        data = bytes(part)
        h.update(b"Y" + struct.pack(">Q", len(data)) + data)
    elif isinstance(part, np.ndarray):
        arr = np.ascontiguousarray(part)
        _feed(h, f"{arr.dtype.str}{arr.shape}")
        h.update(b"A" + hashlib.sha256(arr.tobytes()).digest())
    elif isinstance(part, Dataset):
        h.update(b"D" + struct.pack(">Q", len(part)))
        for elem in part:
            _feed(h, f"{elem.tag:08X}{elem.VR}")
            if elem.VR == "SQ":
                h.update(b"Q" + struct.pack(">Q", len(elem.value)))
                for item in elem.value:
                    _feed(h, item)
            else:
                _feed(h, repr(elem.value))
    elif isinstance(part, list | tuple):
        h.update(b"L" + struct.pack(">Q", len(part)))
        for item in part:
            _feed(h, item)
    else:
        raise TypeError(f"cannot digest a {type(part).__name__} content input")


def content_digest(*parts: object) -> str:
    """A hex SHA-256 of everything that shapes an object's content.

    Accepts strings, numbers, booleans, None, bytes, arrays, datasets (every element,
    sequences included) and lists of these; the order of ``parts`` matters.
    """
    h = hashlib.sha256()
    for part in parts:
        _feed(h, part)
    return h.hexdigest()


def _model_key(model_version: str, model_sha256: str) -> str:
    return f"{model_version}\x1e{model_sha256}"


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {_KINDS}")


def instance_uid(
    kind: str, source_sop_uids: Iterable[str], model_version: str, model_sha256: str,
    content: str = "",
) -> str:
    """SOP Instance UID of an output built from ``source_sop_uids`` (order-insensitive)
    whose content inputs have the digest ``content`` (see :func:`content_digest`)."""
    _check_kind(kind)
    sources = sorted(set(source_sop_uids))
    if not sources:
        raise ValueError("an output needs at least one source SOP Instance UID")
    return uid_from("instance", kind, _model_key(model_version, model_sha256), content,
                    *sources)


def series_uid(kind: str, study_uid: str, model_version: str, model_sha256: str) -> str:
    """Series Instance UID: one series per study, kind and model."""
    _check_kind(kind)
    return uid_from("series", kind, _model_key(model_version, model_sha256), study_uid)


def series_number(kind: str, model_version: str) -> int:
    """A stable series number in 9000-9899; SR series are even, SC series odd.

    Stable per model version, so the viewer's series order does not jump between studies;
    the parity keeps an SR and an SC of one model from sharing a number.
    """
    _check_kind(kind)
    digest = hashlib.sha256(model_version.encode()).digest()
    slot = int.from_bytes(digest[:8], "big") % 450
    return 9000 + 2 * slot + (1 if kind == SC else 0)


def device_uid(model_version: str, model_sha256: str) -> str:
    """The Device Observer UID of a model: changes with every version and weights file."""
    return uid_from("device", _model_key(model_version, model_sha256))


__all__ = [
    "GSPS",
    "KOS",
    "NOT_ANALYSED_SR",
    "content_digest",
    "is_own_uid",
    "SC",
    "SR",
    "device_uid",
    "instance_uid",
    "series_number",
    "series_uid",
    "uid_from",
]
