"""Each spooled file is parsed once per analysis: counted on a real spooled study analysed
end to end, with the headers the output builders get checked against a header-only read.

The counting wrappers call the real pydicom functions and only record their arguments."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.filereader
import pytest
from sqlalchemy import select

from db.errors import TransientError
from db.models import Analysis, Instance, Prediction
from db.session import Database
from db.settings import Settings
from dicom_node.pixels import decode_pixels
from tests.support.dicom_factory import make_cxr, write
from tests.support.worker_data import add_study, register_and_promote
from worker.analysis import analyse_study
from worker.model_cache import ModelCache
from worker.records import InstanceRef
from worker.study_files import DEFER_BYTES, load_pixels, read_instances, select_images

PIXEL_DATA = 0x7FE00010


@pytest.fixture
def wsettings(make_settings, sqlite_url: str) -> Settings:  # type: ignore[no-untyped-def]
    return make_settings(database_url=sqlite_url, pacs="PACS@127.0.0.1:1",  # type: ignore[no-any-return]
                         hotspot_presentation_state=True, key_object_for_positive=True)


@pytest.fixture
def db(wsettings: Settings) -> Iterator[Database]:
    database = Database(wsettings)
    yield database
    database.dispose()


class Reads:
    """Which files pydicom parses (``dcmread``) and whose deferred values it fetches."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.parsed: Counter[str] = Counter()
        self.deferred: Counter[str] = Counter()
        real_read: Callable[..., Any] = pydicom.dcmread
        real_deferred: Callable[..., Any] = pydicom.filereader.read_deferred_data_element

        def dcmread(fp: Any, *args: Any, **kwargs: Any) -> Any:
            self.parsed[str(fp)] += 1
            return real_read(fp, *args, **kwargs)

        def deferred(fileobj_type: Any, src: Any, *args: Any, **kwargs: Any) -> Any:
            self.deferred[str(getattr(src, "name", src))] += 1
            return real_deferred(fileobj_type, src, *args, **kwargs)

        monkeypatch.setattr(pydicom, "dcmread", dcmread)
        monkeypatch.setattr(pydicom.filereader, "read_deferred_data_element", deferred)


def _spooled(db: Database, study_id: int) -> dict[str, str]:
    with db.session() as s:
        rows = s.scalars(select(Instance).where(Instance.study_id == study_id)).all()
        return {r.sop_instance_uid: r.path for r in rows}


def test_each_spooled_file_is_parsed_once_per_analysis(
        db: Database, wsettings: Settings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    register_and_promote(db, wsettings, "m1")
    # 512 x 512 x 16 bits: pixel data well over DEFER_BYTES, so it stays on disk until used.
    frontal = make_cxr(rows=512, cols=512, view_position="PA", seed=1)
    lateral = make_cxr(study_uid=frontal.StudyInstanceUID, rows=512, cols=512,
                       view_position="LL", seed=2, instance_number=2)
    assert len(frontal.PixelData) > DEFER_BYTES
    study_id = add_study(db, wsettings, [write(frontal, tmp_path / "f.dcm"),
                                         write(lateral, tmp_path / "l.dcm")])
    spooled = _spooled(db, study_id)
    reads = Reads(monkeypatch)

    out = analyse_study(db, wsettings, ModelCache(wsettings), study_id, 1)

    assert out.status == "done", out
    assert len(out.delivery_ids) >= 3  # SR, SC and the hotspot GSPS were built
    assert reads.parsed == Counter({path: 1 for path in spooled.values()})
    # The scored frontal's pixels were fetched once; the lateral's never left the disk.
    assert reads.deferred == Counter({spooled[frontal.SOPInstanceUID]: 1})
    with db.session() as s:
        preds = {p.instance.sop_instance_uid: p for p in s.scalars(
            select(Prediction).join(Analysis).where(Analysis.study_id == study_id))}
    assert preds[frontal.SOPInstanceUID].scored
    assert not preds[lateral.SOPInstanceUID].scored


@pytest.mark.shared_data
def test_real_files_are_parsed_once_per_analysis(
        db: Database, wsettings: Settings, shared_dicom: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    register_and_promote(db, wsettings, "m1")
    study_id = add_study(db, wsettings, sorted(shared_dicom.glob("*.dcm")))
    spooled = _spooled(db, study_id)
    assert len(spooled) == 4
    reads = Reads(monkeypatch)

    out = analyse_study(db, wsettings, ModelCache(wsettings), study_id, 1)

    assert out.status in ("done", "skipped"), out
    assert reads.parsed == Counter({path: 1 for path in spooled.values()})
    assert all(n == 1 for n in reads.deferred.values())
    with db.session() as s:
        scored = {p.instance.path for p in s.scalars(
            select(Prediction).join(Analysis).where(Analysis.study_id == study_id))
            if p.scored}
    assert set(reads.deferred) <= scored


def test_builders_get_what_a_header_only_read_gives(make_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings()
    big = make_cxr(rows=512, cols=512, seed=3)
    big.DataSetTrailingPadding = b"\0" * 16  # after the pixel data: never part of a header
    small = make_cxr(rows=64, cols=48, seed=4, study_uid=big.StudyInstanceUID)
    lateral = make_cxr(rows=512, cols=512, view_position="LL", seed=5,
                       study_uid=big.StudyInstanceUID)
    no_pixels = make_cxr(seed=6, study_uid=big.StudyInstanceUID)
    del no_pixels.PixelData
    no_pixels.DataSetTrailingPadding = b"\0" * 8  # no pixel data: a header keeps it
    paths = [write(ds, tmp_path / f"{i}.dcm")
             for i, ds in enumerate((big, small, lateral, no_pixels))]
    refs = tuple(InstanceRef(i, str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID),
                             p) for i, p in enumerate(paths))

    images = select_images(refs, read_instances(refs), settings)
    assert images[2].header.get_item(PIXEL_DATA, keep_deferred=True).value is None
    load_pixels(images)

    assert [i.scored for i in images] == [True, True, False, False]
    assert "MissingPixelDataError" in (images[3].skip_reason or "")
    for img, path in zip(images, paths, strict=True):
        expected = pydicom.dcmread(path, stop_before_pixels=True)
        assert list(img.header.keys()) == list(expected.keys())
        assert img.header == expected
    for img, path in zip(images[:2], paths[:2], strict=True):
        np.testing.assert_array_equal(img.image, decode_pixels(pydicom.dcmread(path)))
    assert "DataSetTrailingPadding" in images[3].header


def test_a_spooled_file_gone_or_replaced_before_its_pixels_is_transient(
        make_settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = make_settings()
    path = write(make_cxr(rows=512, cols=512), tmp_path / "a.dcm")
    refs = (InstanceRef(1, str(pydicom.dcmread(path).SOPInstanceUID), path),)

    images = select_images(refs, read_instances(refs), settings)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(TransientError, match="replaced"):
        load_pixels(images)

    images = select_images(refs, read_instances(refs), settings)
    path.unlink()
    with pytest.raises(TransientError, match="missing"):
        load_pixels(images)
