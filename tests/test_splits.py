"""Patient-wise splits: deterministic, keyed, close to the configured fractions."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

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


def test_near_duplicate_patients_join_through_chains_and_leave_others_alone() -> None:
    from trainer.splits import near_duplicate_patients

    far = (1 << 256) - 1  # every bit differs from 0
    patient_of = {"a1": "A", "b1": "B", "b2": "B", "c1": "C", "d1": "D", "a2": "A"}
    hashes = {"a1": 0, "b1": 1, "b2": far, "c1": far ^ 3, "d1": (1 << 128) - 1,
              "a2": 7}  # a1~b1 (A-B), b2~c1 (B-C); a2 is A's own second film
    linked = near_duplicate_patients(patient_of, hashes, max_distance=4)
    assert linked == {"A": "A", "B": "A", "C": "A"}
    recs = [Rec(p, i) for i, p in enumerate(["A", "B", "C", "D"])]
    for key in ("k1", "k2", "k3"):
        parts = split_records(recs, key, (0.4, 0.3, 0.3), linked)
        where = {r.patient_key: s for s, rs in parts.items() for r in rs}
        assert where["A"] == where["B"] == where["C"] == assign_split("A", key,
                                                                      (0.4, 0.3, 0.3))
        assert where["D"] == assign_split("D", key, (0.4, 0.3, 0.3))


def test_nightly_split_keeps_a_real_film_and_its_altered_copy_on_one_side(
    settings, shared_data, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    """A shared-pool film and a resized, contrast-stretched JPEG copy of it under another
    patient id: the gather step of the nightly run puts both in the same split, although
    the two patient ids on their own fall in different splits."""
    import csv
    import io
    import shutil

    import numpy as np
    from PIL import Image

    from db.session import Database
    from dicom_node.pixels import load_image_file
    from trainer.near_duplicates import DEFAULT_MAX_DISTANCE, hamming, perceptual_hash
    from trainer.retrain_steps import gather

    with (shared_data / "labels.csv").open(newline="", encoding="utf-8") as fh:
        pool = [r for r in csv.DictReader(fh) if r["source"] == "ieee8023"][:6]
    folder = tmp_path / "dupset"
    (folder / "images").mkdir(parents=True)
    fractions = tuple(settings.split_fractions)
    original, others = pool[0], pool[1:]
    copy_id = next(f"copy-{i}" for i in range(1000)
                   if assign_split(f"copy-{i}", settings.split_key, fractions)
                   != assign_split(original["patient_id"], settings.split_key, fractions))
    film = Image.open(shared_data / original["path"]).convert("L")
    altered = np.asarray(film.resize((film.width * 9 // 10, film.height * 9 // 10)),
                         dtype=np.float64)
    altered = np.clip((altered - 20) * 1.15, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(altered).save(buffer, format="JPEG", quality=70)
    (folder / "images" / "copy.jpg").write_bytes(buffer.getvalue())
    rows = [("images/copy.jpg", original["label_name"], copy_id)]
    for r in [original, *others]:
        name = Path(r["path"]).name
        shutil.copyfile(shared_data / r["path"], folder / "images" / name)
        rows.append((f"images/{name}", r["label_name"], r["patient_id"]))
    with (folder / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id", "label_name"])
        w.writerows((p, "", pid, name) for p, name, pid in rows)
    assert hamming(perceptual_hash(load_image_file(folder / "images" / "copy.jpg")),
                   perceptual_hash(load_image_file(shared_data / original["path"]))
                   ) <= DEFAULT_MAX_DISTANCE

    db = Database(settings)
    try:
        gathered = gather(db, settings, [folder])
    finally:
        db.dispose()
    where = {r.path.name: split for split, recs in (("train", gathered.train),
                                                     ("validation", gathered.validation),
                                                     ("test", gathered.test))
             for r in recs}
    assert len(where) == len(rows)
    assert where["copy.jpg"] == where[Path(original["path"]).name]
    first = min(copy_id, original["patient_id"])
    assert gathered.linked_patients == {copy_id: first, original["patient_id"]: first}
