"""Patient-wise splits: deterministic, keyed, close to the configured fractions."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from trainer.splits import Split, assign_split, split_records


@dataclass(frozen=True)
class Rec:
    patient_key: str
    image: int


def test_split_is_stable_and_keyed() -> None:
    ids = [f"P{i}" for i in range(3000)]
    a = [assign_split(i, "k1", (0.7, 0.15, 0.15)) for i in ids]
    assert a == [assign_split(i, "k1", (0.7, 0.15, 0.15)) for i in ids]
    counts = Counter(a)
    assert abs(counts[Split.TRAIN] / 3000 - 0.7) < 0.03
    assert abs(counts[Split.TEST] / 3000 - 0.15) < 0.03
    b = [assign_split(i, "k2", (0.7, 0.15, 0.15)) for i in ids]
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 1000


def test_images_of_one_patient_share_a_split_whatever_else_is_present() -> None:
    recs = [Rec(f"P{i % 200}", i) for i in range(1000)]
    full = split_records(recs, "k", (0.6, 0.2, 0.2))
    part = split_records(recs[::3], "k", (0.6, 0.2, 0.2))
    where = {r.patient_key: s for s, rs in full.items() for r in rs}
    for s, rs in full.items():
        assert all(where[r.patient_key] == s for r in rs)
    for s, rs in part.items():
        assert all(where[r.patient_key] == s for r in rs)
