"""The durable spool on a real file system: names, staging, publishing, cleanup."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dicom_node import spool


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2/3", "..", "", "1.2.3." + "4" * 80,
                                 "1.2.\x00", "a b"])
def test_bad_uids_become_digests(uid: str, tmp_path: Path) -> None:
    name = spool.safe_uid_name(uid)
    assert "/" not in name and name not in ("", ".", "..")
    path = spool.instance_path(tmp_path, uid, uid)
    assert path.parent.parent == tmp_path


def test_good_uid_is_kept() -> None:
    assert spool.safe_uid_name("1.2.840.10008.1.2") == "1.2.840.10008.1.2"


def test_stage_and_publish(tmp_path: Path) -> None:
    final = spool.instance_path(tmp_path, "1.2.3", "1.2.3.4")
    staged = spool.stage(final, [b"abc", memoryview(b"def")])
    assert staged.size == 6 and staged.sha256 == hashlib.sha256(b"abcdef").hexdigest()
    assert spool.is_temp_name(staged.temp.name) and not final.exists()
    staged.publish()
    assert final.read_bytes() == b"abcdef" and not staged.temp.exists()


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b"partial"
        raise OSError("disk went away")

    final = spool.instance_path(tmp_path, "1.2.3", "1.2.3.5")
    with pytest.raises(spool.SpoolWriteError):
        spool.stage(final, chunks())
    assert not final.parent.exists() or list(final.parent.iterdir()) == []


def test_free_space_check(tmp_path: Path) -> None:
    spool.check_free_space(tmp_path, 0)
    with pytest.raises(spool.SpoolFullError):
        spool.check_free_space(tmp_path, 10**9)


def test_stale_temp_files_removed(tmp_path: Path) -> None:
    final = spool.instance_path(tmp_path, "1.2.3", "1.2.3.6")
    staged = spool.stage(final, [b"x"])
    kept = spool.stage(spool.instance_path(tmp_path, "1.2.3", "1.2.3.7"), [b"y"])
    kept.publish()
    assert spool.remove_stale_temp_files(tmp_path) == [staged.temp]
    assert [p.name for p in (tmp_path / "1.2.3").iterdir()] == ["1.2.3.7.dcm"]


def test_missing_spool_is_refused_as_transient(tmp_path: Path) -> None:
    """An unmounted or deleted spool gets 0xA700 (a TransientError), never a write elsewhere."""
    from db.errors import TransientError

    with pytest.raises(TransientError):
        spool.check_free_space(tmp_path / "not-mounted", 0)
