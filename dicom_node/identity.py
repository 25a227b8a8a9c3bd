"""Deterministic identity of our output objects.

UIDs and series numbers are derived from the source SOP Instance UIDs, the model version
and weights hash, and the kind of object, never drawn at random. Re-building the result of
the same analysis therefore gives the same SOP Instance UID, and a repeated send is a
harmless duplicate that the PACS stores once. A new model version gives new UIDs, so its
results never overwrite an older model's.

UIDs have the form ``2.25.<decimal of a 128-bit UUID>`` (PS3.5 B.2), at most 44 characters.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable

# A fixed namespace for every UID cxr-triage derives; changing it changes every UID.
_NAMESPACE = uuid.UUID("8f0c2f4e-3b1d-5a4e-9a57-6c7872747269")

SR = "sr"
SC = "sc"
NOT_ANALYSED_SR = "sr-not-analysed"
_KINDS = (SR, SC, NOT_ANALYSED_SR)


def uid_from(*parts: str) -> str:
    """A ``2.25`` UID from a UUID5 of the joined parts (order matters)."""
    name = "\x1f".join(parts)
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def _model_key(model_version: str, model_sha256: str) -> str:
    return f"{model_version}\x1e{model_sha256}"


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {_KINDS}")


def instance_uid(
    kind: str, source_sop_uids: Iterable[str], model_version: str, model_sha256: str
) -> str:
    """SOP Instance UID of an output built from ``source_sop_uids`` (order-insensitive)."""
    _check_kind(kind)
    sources = sorted(set(source_sop_uids))
    if not sources:
        raise ValueError("an output needs at least one source SOP Instance UID")
    return uid_from("instance", kind, _model_key(model_version, model_sha256), *sources)


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
    "NOT_ANALYSED_SR",
    "SC",
    "SR",
    "device_uid",
    "instance_uid",
    "series_number",
    "series_uid",
    "uid_from",
]
