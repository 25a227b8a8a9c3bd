"""Patient-wise train/validation/test splits that never move.

Each patient is placed by a keyed hash (HMAC-SHA256 with ``settings.split_key``) of its
patient id, so the same patient lands in the same split every night, on every machine,
whatever else is in the data.  Images are never split individually: several images of
one patient would otherwise leak between training and test.  Changing ``split_key`` or
``split_fractions`` reshuffles everyone, which invalidates comparisons with older runs.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar


class Split(enum.StrEnum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


def patient_fraction(patient_key: str, key: str) -> float:
    """A stable number in [0, 1) for a patient, unpredictable without the key."""
    mac = hmac.new(key.encode("utf-8"), patient_key.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "big") / 2.0**64


def assign_split(patient_key: str, key: str,
                 fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> Split:
    """The split of one patient."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {tuple(fractions)} must be three summing to 1")
    u = patient_fraction(patient_key, key)
    if u < fractions[0]:
        return Split.TRAIN
    if u < fractions[0] + fractions[1]:
        return Split.VALIDATION
    return Split.TEST


class HasPatient(Protocol):
    @property
    def patient_key(self) -> str: ...


T = TypeVar("T", bound=HasPatient)


def split_records(records: Iterable[T], key: str,
                  fractions: Sequence[float]) -> dict[Split, list[T]]:
    """Group records by their patient's split."""
    out: dict[Split, list[T]] = {s: [] for s in Split}
    cache: dict[str, Split] = {}
    for rec in records:
        pk = rec.patient_key
        if pk not in cache:
            cache[pk] = assign_split(pk, key, fractions)
        out[cache[pk]].append(rec)
    return out


__all__ = ["Split", "assign_split", "patient_fraction", "split_records"]
