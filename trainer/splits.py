"""Patient-wise train/validation/test splits that never move.

Each patient is placed by a keyed hash (HMAC-SHA256 with ``settings.split_key``) of its
patient id, so the same patient lands in the same split every night, on every machine,
whatever else is in the data.  Images are never split individually: several images of
one patient would otherwise leak between training and test.  Changing ``split_key`` or
``split_fractions`` reshuffles everyone, which invalidates comparisons with older runs.

The same film is sometimes published under two patient ids (resized, re-encoded, in two
collections).  :func:`near_duplicate_patients` joins such patients, by the perceptual hash
of :mod:`trainer.near_duplicates`, into one group placed by its smallest patient key, so a
film and its copy never sit on both sides of the split.  Patients without such a copy keep
their own placement.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

from trainer.near_duplicates import DEFAULT_MAX_DISTANCE, near_duplicate_groups


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


def near_duplicate_patients(
    patient_of: Mapping[str, str], hashes: Mapping[str, int],
    max_distance: int = DEFAULT_MAX_DISTANCE,
) -> dict[str, str]:
    """For every patient of a group joined by near-duplicate films under different patient
    ids (through any chain of them), the patient key the group's split is drawn from: its
    smallest.  ``patient_of`` and ``hashes`` are keyed by image; patients not in the result
    keep their own key."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for group in near_duplicate_groups(hashes, max_distance):
        patients = sorted({patient_of[image] for image in group})
        for other in patients[1:]:
            ra, rb = find(patients[0]), find(other)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return {p: find(p) for p in parent}


def split_records(records: Iterable[T], key: str, fractions: Sequence[float],
                  placed_as: Mapping[str, str] | None = None) -> dict[Split, list[T]]:
    """Group records by their patient's split; a patient in ``placed_as`` (see
    :func:`near_duplicate_patients`) takes the split of the patient key given there."""
    out: dict[Split, list[T]] = {s: [] for s in Split}
    cache: dict[str, Split] = {}
    links = placed_as or {}
    for rec in records:
        pk = links.get(rec.patient_key, rec.patient_key)
        if pk not in cache:
            cache[pk] = assign_split(pk, key, fractions)
        out[cache[pk]].append(rec)
    return out


__all__ = ["Split", "assign_split", "near_duplicate_patients", "patient_fraction",
           "split_records"]
