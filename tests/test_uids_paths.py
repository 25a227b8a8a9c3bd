"""The validated UID type and the safe-path helper of the foundation floor."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from db import paths
from db.settings import Settings
from db.uids import InvalidUidError, Uid, is_valid_uid, parse_uid
from worker.heatmap_store import heatmap_path
from worker.outputs import study_outbox

HOSTILE = ["../../x", "/some/dir", "..", ".", "1.2/../../3", "1.2.3\\..\\x", "", "1..2",
           ".1.2", "1.2.", "1.2.3a", "1.2.3 4", "1" * 65, "\x00", "1.2\n3"]


def test_well_formed_uids_pass_with_padding_stripped() -> None:
    assert parse_uid("1.2.840.10008.1.2\x00") == "1.2.840.10008.1.2"
    assert parse_uid("1.2.3 ") == "1.2.3"
    assert isinstance(parse_uid("1.2.3"), Uid)
    assert parse_uid("1" * 64) == "1" * 64


def test_leading_zero_components_are_accepted_and_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="db.uids"):
        assert parse_uid("1.2.03.4", "StudyInstanceUID") == "1.2.03.4"
    assert "leading-zero" in caplog.text and "1.2.03.4" in caplog.text


@pytest.mark.parametrize("raw", HOSTILE)
def test_malformed_uids_are_refused_with_the_field_named(raw: str) -> None:
    with pytest.raises(InvalidUidError, match="SOPInstanceUID"):
        parse_uid(raw, "SOPInstanceUID")
    assert not is_valid_uid(raw)


def test_over_long_uids_are_refused_never_cut() -> None:
    with pytest.raises(InvalidUidError, match="65 characters"):
        parse_uid("1." + "2" * 63)


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_values_stay_inside_the_root(tmp_path: Path, raw: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    target = paths.under(root, paths.uid_name(raw), f"{paths.uid_name(raw)}.npy")
    assert root.resolve() in target.resolve().parents


def test_unsafe_names_and_symlink_escapes_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    for name in ("..", "../x", "/etc", "a/b", ".hidden", ""):
        with pytest.raises(paths.UnsafePathError):
            paths.under(root, name)
    with pytest.raises(paths.UnsafePathError, match="outside"):
        paths.under(root, "link", "file.npy")
    with pytest.raises(paths.UnsafePathError):
        paths.check_inside(root, root / ".." / "outside")


@pytest.mark.parametrize("raw", ["../../x", "/some/dir", "..", "1.2/../3"])
def test_heatmap_and_outbox_paths_of_hostile_uids_stay_in_the_data_dir(
        tmp_path: Path, raw: str) -> None:
    s = Settings(data_dir=tmp_path / "data")
    s.ensure_dirs()
    for path in (heatmap_path(s, raw, raw), study_outbox(s, raw)):
        resolved = path.resolve()
        assert s.data_dir.resolve() in resolved.parents
        assert raw not in str(path)
