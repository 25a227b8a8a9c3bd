"""Hostile and broken input through the real listener and, where the listener accepts it,
the real analysis: each case asserts the DICOM status, what is recorded (state, reason),
that no file appears outside the data dir, and that the listener still answers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select, update

from db.models import Analysis, Instance, Prediction, Study, StudyState
from db.session import Database
from db.settings import Settings, load_settings
from dicom_node.listener import NodeHandle, start_node
from tests.support import hostile as h
from tests.support.listener_peers import send_files_pynetdicom, spool_files
from tests.support.worker_data import register_and_promote
from worker.analysis import analyse_study
from worker.model_cache import ModelCache

ABSOLUTE_TARGETS = (Path("/some/dir"), Path("/some"))


@dataclass
class Env:
    root: Path
    settings: Settings
    node: NodeHandle
    cache: ModelCache


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("hostile")
    # Deep enough that "../../x" from any folder under the data dir stays inside ``root``,
    # where the test can see it.
    data_dir = root / "a" / "b" / "c" / "data"
    settings = load_settings(env={}, overrides=dict(
        data_dir=data_dir, port=0, bind_address="127.0.0.1", min_free_mb=1,
        pacs="PACS@127.0.0.1:1"))
    settings.ensure_dirs()
    node = start_node(settings, run_stability=False)
    register_and_promote(node.db, settings, "hostile-m1")
    yield Env(root, settings, node, ModelCache(settings))
    node.stop()


def _outside_files(e: Env) -> set[Path]:
    data = e.settings.data_dir.resolve()
    return {p for p in e.root.rglob("*")
            if p.is_file() and data not in p.resolve().parents and "inbox" not in p.parts}


def _echo(port: int) -> int:
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
    assert assoc.is_established, "the listener no longer accepts associations"
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status)


def _send(e: Env, case: h.Crafted, name: str) -> int:
    path = h.write_crafted(case, e.root / "inbox", name)
    (status,) = send_files_pynetdicom(e.node.port, [path], case.transfer_syntax,
                                      case.context_sop_class)
    return status


def _rows_for(db: Database, sop_uid: str) -> list[Instance]:
    with db.session() as s:
        return list(s.scalars(select(Instance).where(
            Instance.sop_instance_uid.like(sop_uid.rstrip("\x00 ")[:60] + "%"))).all())


def _analyse(e: Env, study_uid: str) -> tuple[StudyState, str | None, list[str | None]]:
    db = e.node.db
    with db.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        s.execute(update(Study).where(Study.id == study.id).values(state=StudyState.QUEUED))
        study_id, generation = study.id, study.generation
    analyse_study(db, e.settings, e.cache, study_id, generation)
    with db.session() as s:
        study = s.get(Study, study_id)
        assert study is not None
        reasons = [p.skip_reason for p in s.scalars(
            select(Prediction).join(Analysis).where(Analysis.study_id == study_id)).all()]
        return study.state, study.reason, reasons


# ---------------------------------------------------------------- refused at the boundary
REFUSED: dict[str, tuple[h.Builder, int, str]] = {
    "study uid ../../x": (lambda: h.with_values(StudyInstanceUID="../../x"), 0xC000,
                          "StudyInstanceUID"),
    "study uid /some/dir": (lambda: h.with_values(StudyInstanceUID="/some/dir"), 0xC000,
                            "StudyInstanceUID"),
    "sop uid ../../x": (lambda: h.with_values(SOPInstanceUID="../../x"), 0xC000,
                        "SOPInstanceUID"),
    "sop uid /some/dir": (lambda: h.with_values(SOPInstanceUID="/some/dir"), 0xC000,
                          "SOPInstanceUID"),
    "series uid ..": (lambda: h.with_values(SeriesInstanceUID=".."), 0xC000,
                      "SeriesInstanceUID"),
    "study uid of 65 characters": (
        lambda: h.with_values(StudyInstanceUID="1.2." + "3" * 61), 0xC000, "65 characters"),
    "sop uid of 100 characters": (
        lambda: h.with_values(SOPInstanceUID="1." + "2" * 98), 0xC000, "100 characters"),
    "study uid with an empty component": (
        lambda: h.with_values(StudyInstanceUID="1.2..3"), 0xC000, "StudyInstanceUID"),
    "study uid with a trailing dot": (
        lambda: h.with_values(StudyInstanceUID="1.2.3."), 0xC000, "StudyInstanceUID"),
    "study uid with letters": (
        lambda: h.with_values(StudyInstanceUID="1.2.abc"), 0xC000, "StudyInstanceUID"),
    "sop uid with an inner space": (
        lambda: h.with_values(SOPInstanceUID="1.2 .3"), 0xC000, "SOPInstanceUID"),
    "sop class uid with a slash": (
        lambda: h.with_values(SOPClassUID="1.2/3"), 0xC000, "SOPClassUID"),
    "missing StudyInstanceUID": (lambda: h.with_values(StudyInstanceUID=None), 0xC000,
                                 "StudyInstanceUID"),
    "missing SOPInstanceUID": (lambda: h.with_values(SOPInstanceUID=None), 0xC000,
                               "SOPInstanceUID"),
    "missing SOPClassUID": (lambda: h.with_values(SOPClassUID=None), 0xC000, "SOPClassUID"),
    "garbage of 64 bytes": (lambda: h.garbage(64, 1), 0xC000, ""),
    "garbage of 20 KiB": (lambda: h.garbage(20_000, 2), 0xC000, ""),
    "deflate syntax, not deflated": (h.deflated_garbage, 0xC000, ""),
    "cut inside an 8 KiB element before Pixel Data": (h.long_comment_cut, 0xC000, "truncated"),
    "cut inside a short element": (h.short_element_cut, 0xC000, ""),
    "cut inside Pixel Data": (h.pixel_data_cut, 0xC000, "runs past the end"),
    "element length of 65520 bytes in 16 received": (h.huge_length_in_header, 0xC000, ""),
    "CT SOP class in a DX context": (lambda: h.sop_class_in_context(h.CT, h.DX), 0xA900,
                                     "presentation context"),
    "SR SOP class in a CR context": (
        lambda: h.sop_class_in_context(h.BASIC_TEXT_SR, h.CR_STORAGE), 0xA900,
        "presentation context"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_at_the_boundary(env: Env, name: str, caplog: pytest.LogCaptureFixture) -> None:
    build, expected, reason = REFUSED[name]
    case = build()
    before_outside = _outside_files(env)
    before_spool = spool_files(env.settings.spool_dir)
    status = _send(env, case, name.replace(" ", "_").replace("/", "_"))
    assert status == expected, name
    assert spool_files(env.settings.spool_dir) == before_spool  # nothing kept
    if case.sop_uid:
        assert _rows_for(env.node.db, case.sop_uid) == []
    assert f"status=0x{expected:04X}" in caplog.text and reason in caplog.text
    assert _outside_files(env) == before_outside
    assert not any(p.exists() for p in ABSOLUTE_TARGETS)
    assert _echo(env.node.port) == 0


@pytest.mark.parametrize("field", ["StudyInstanceUID", "SOPInstanceUID"])
def test_uids_sharing_their_first_64_characters_are_never_merged(env: Env, field: str) -> None:
    first, second = h.two_uids_sharing_64(field)
    statuses = [_send(env, c, f"long-{field}-{i}") for i, c in enumerate((first, second))]
    assert statuses == [0xC000, 0xC000]  # refused, never cut to one row and dropped
    uid64 = (first.study_uid if field == "StudyInstanceUID" else first.sop_uid)[:64]
    with env.node.db.session() as s:
        column = Study.study_uid if field == "StudyInstanceUID" else Instance.sop_instance_uid
        model = Study if field == "StudyInstanceUID" else Instance
        assert s.scalars(select(model).where(column == uid64)).all() == []


# -------------------------------------------------------------- accepted as the standard asks
ACCEPTED: dict[str, tuple[h.Builder, str]] = {
    "NUL-padded UIDs": (lambda: h.with_values(StudyInstanceUID="1.2.3.4.5\x00",
                                              SOPInstanceUID="1.2.3.4.6\x00"), "1.2.3.4.6"),
    "leading-zero component": (lambda: h.with_values(SOPInstanceUID="1.2.03.4.7"),
                               "1.2.03.4.7"),
    "UID of exactly 64 characters": (
        lambda: h.with_values(SOPInstanceUID="1.2." + "4" * 60), "1.2." + "4" * 60),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_with_the_uid_as_the_standard_reads_it(env: Env, name: str) -> None:
    build, stored_uid = ACCEPTED[name]
    before_outside = _outside_files(env)
    assert _send(env, build(), name.replace(" ", "_")) == 0
    (row,) = _rows_for(env.node.db, stored_uid)
    assert row.sop_instance_uid == stored_uid
    assert Path(row.path).is_file() and env.settings.spool_dir in Path(row.path).parents
    assert _outside_files(env) == before_outside
    assert _echo(env.node.port) == 0


# ------------------------------------------------- stored, then recorded by the analysis
ANALYSED: dict[str, tuple[h.Builder, StudyState, str]] = {
    "huge Rows and Columns, tiny pixel data": (
        lambda: h.pixels_mismatch(60000, 60000, 64), StudyState.FAILED, "bad input"),
    "pixel data shorter than Rows x Columns": (
        lambda: h.pixels_mismatch(32, 32, 100), StudyState.FAILED, "bad input"),
    "pixel data longer than Rows x Columns": (
        lambda: h.pixels_mismatch(8, 8, 4096), StudyState.FAILED, "bad input"),
    "BitsAllocated 64, BitsStored 40": (lambda: h.bit_depth(64, 40), StudyState.FAILED,
                                        "bad input"),
    "BitsAllocated 0": (lambda: h.bit_depth(0, 0), StudyState.FAILED, "bad input"),
    "BitsStored above BitsAllocated": (lambda: h.bit_depth(16, 24), StudyState.FAILED,
                                       "bad input"),
    "two frames": (h.multi_frame, StudyState.FAILED, "MultiFrameError"),
    "Modality LUT with 12-bit entries": (h.modality_lut_12_bit, StudyState.FAILED,
                                         "TypeError"),
    "PALETTE COLOR": (lambda: h.photometric("PALETTE COLOR"), StudyState.FAILED,
                      "UnsupportedImageError"),
    "MONOCHROME2 with 3 samples": (lambda: h.photometric("MONOCHROME2", 3),
                                   StudyState.FAILED, "bad input"),
    "native pixels under JPEG Baseline": (h.jpeg_claimed_raw_sent, StudyState.FAILED,
                                          "bad input"),
    "DX for processing": (h.for_processing, StudyState.SKIPPED, "not for presentation"),
    "no Pixel Data": (h.no_pixel_data, StudyState.FAILED, "MissingPixelDataError"),
    "lateral view": (h.lateral, StudyState.SKIPPED, "lateral view"),
}


@pytest.mark.parametrize("name", sorted(ANALYSED))
def test_stored_then_recorded_with_its_reason(env: Env, name: str) -> None:
    build, state, reason = ANALYSED[name]
    case = build()
    before_outside = _outside_files(env)
    assert _send(env, case, name.replace(" ", "_")) == 0
    got_state, got_reason, skip_reasons = _analyse(env, case.study_uid)
    assert got_state == state, (got_reason, skip_reasons)
    assert got_reason is not None and reason in got_reason
    assert "internal error" not in got_reason
    assert any(r and reason in r for r in skip_reasons)
    assert _outside_files(env) == before_outside
    assert _echo(env.node.port) == 0


def test_a_bad_image_does_not_fail_its_good_neighbour(env: Env) -> None:
    good = h.good()
    bad = h.modality_lut_12_bit(study_uid=good.study_uid)
    assert [_send(env, c, f"pair-{i}") for i, c in enumerate((good, bad))] == [0, 0]
    state, reason, skip_reasons = _analyse(env, good.study_uid)
    assert state == StudyState.DONE and reason is None
    assert sum(1 for r in skip_reasons if r is None) == 1  # the good image is scored
    assert any(r and "TypeError" in r for r in skip_reasons)


# ---------------------------------------------- rows written around the listener (worker)
def _insert_study(e: Env, study_uid: str, sop_uids: list[str]) -> tuple[int, list[Path]]:
    """Rows as only a hand-edited database could hold them (the listener refuses them),
    each pointing at a real, readable file in the spool."""
    from db.models import utcnow

    now = utcnow()
    files = []
    with e.node.db.session() as s:
        study = Study(study_uid=study_uid, state=StudyState.QUEUED, generation=1,
                      queued_at=now, updated_at=now, last_instance_at=now)
        s.add(study)
        s.flush()
        for i, sop in enumerate(sop_uids):
            ds = h.cxr(instance_number=i + 1)
            src = e.settings.spool_dir / "handmade" / f"{ds.SOPInstanceUID}.dcm"
            src.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(src, enforce_file_format=True)
            files.append(src)
            s.add(Instance(study_id=study.id, sop_instance_uid=sop,
                           sop_class_uid=h.DX, series_uid=None,
                           transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                           modality="DX", view_position="PA", body_part="CHEST",
                           path=str(src), size_bytes=src.stat().st_size))
        return study.id, files


@pytest.mark.parametrize("study_uid", ["../../x", "/some/dir", "..", "1.2/../../../3"])
def test_hostile_study_uid_rows_never_write_outside_the_data_dir(env: Env, study_uid: str) -> None:
    before_outside = _outside_files(env)
    study_id, _ = _insert_study(env, study_uid, [h.generate_uid()])
    out = analyse_study(env.node.db, env.settings, env.cache, study_id, 1)
    assert out.status == "failed" and out.reason == "bad input: invalid StudyInstanceUID"
    with env.node.db.session() as s:
        study = s.get(Study, study_id)
        assert study is not None and study.state == StudyState.FAILED
        assert study.reason is not None and "internal error" not in study.reason
    assert _outside_files(env) == before_outside
    assert not any(p.exists() for p in ABSOLUTE_TARGETS)


@pytest.mark.parametrize("sop_uid", ["../../y", "/some/dir"])
def test_hostile_sop_uid_row_is_recorded_and_its_neighbour_scored(env: Env, sop_uid: str) -> None:
    before_outside = _outside_files(env)
    study_id, _ = _insert_study(env, h.generate_uid(), [h.generate_uid(), sop_uid])
    out = analyse_study(env.node.db, env.settings, env.cache, study_id, 1)
    assert out.status == "done", out
    with env.node.db.session() as s:
        reasons = {p.instance.sop_instance_uid: p.skip_reason for p in s.scalars(
            select(Prediction).join(Analysis).where(Analysis.study_id == study_id)).all()}
    assert reasons[sop_uid] == "bad input: invalid SOPInstanceUID"
    assert _outside_files(env) == before_outside
    assert not any(p.exists() for p in ABSOLUTE_TARGETS)
    heatmaps = [p for p in env.settings.heatmaps_dir.rglob("*") if p.is_file()]
    assert all(env.settings.heatmaps_dir in p.parents for p in heatmaps)


def test_cleanup_leaves_nothing_outside(env: Env) -> None:
    """Last: the whole run wrote nothing outside the data dir but the test's own inbox."""
    assert _outside_files(env) == set()
    shutil.rmtree(env.root / "inbox", ignore_errors=True)
