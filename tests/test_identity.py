"""Deterministic UIDs: a repeated build is the same object, a new model a new one."""

from __future__ import annotations

import re

import pydicom
import pytest

from dicom_node import identity
from dicom_node.sc import build_heatmap_sc
from dicom_node.sr import build_sr
from tests.support.dicom_factory import make_cxr
from tests.support.results_factory import make_model, make_result, scored

UID_RE = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


def test_instance_uid_is_deterministic_order_insensitive_and_valid() -> None:
    a = identity.instance_uid(identity.SR, ["1.2.3", "1.2.4"], "v1", "aa")
    b = identity.instance_uid(identity.SR, ["1.2.4", "1.2.3"], "v1", "aa")
    assert a == b
    assert UID_RE.match(a) and len(a) <= 64
    assert pydicom.uid.UID(a).is_valid


@pytest.mark.parametrize(
    "changed",
    [
        dict(kind=identity.SC),
        dict(sources=["1.2.3"]),
        dict(version="v2"),
        dict(sha="bb"),
    ],
)
def test_instance_uid_changes_with_each_input(changed: dict[str, object]) -> None:
    base = dict(kind=identity.SR, sources=["1.2.3", "1.2.4"], version="v1", sha="aa")
    other = {**base, **changed}
    assert identity.instance_uid(base["kind"], base["sources"], base["version"], base["sha"]) \
        != identity.instance_uid(other["kind"], other["sources"], other["version"], other["sha"])


def test_series_uid_and_number_are_stable_and_distinct_per_kind() -> None:
    sr = identity.series_uid(identity.SR, "1.2.9", "v1", "aa")
    sc = identity.series_uid(identity.SC, "1.2.9", "v1", "aa")
    assert sr == identity.series_uid(identity.SR, "1.2.9", "v1", "aa")
    assert sr != sc and UID_RE.match(sr)
    n_sr = identity.series_number(identity.SR, "v1")
    n_sc = identity.series_number(identity.SC, "v1")
    assert 9000 <= n_sr < 9900 and 9000 <= n_sc < 9900
    assert n_sr % 2 == 0 and n_sc == n_sr + 1
    assert n_sr == identity.series_number(identity.SR, "v1")


def test_device_uid_changes_with_version_and_weights() -> None:
    base = identity.device_uid("v1", "aa")
    assert base == identity.device_uid("v1", "aa")
    assert base != identity.device_uid("v2", "aa")
    assert base != identity.device_uid("v1", "bb")


def test_unknown_kind_and_empty_sources_are_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        identity.instance_uid("pdf", ["1.2"], "v1", "aa")
    with pytest.raises(ValueError, match="source"):
        identity.instance_uid(identity.SR, [], "v1", "aa")


def _device_uid_in(sr: pydicom.Dataset) -> str:
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "121012":  # Device Observer UID
            return str(item.UID)
    raise AssertionError("no Device Observer UID in the SR")


def test_built_objects_repeat_their_uids_and_a_new_model_changes_them() -> None:
    study = "1.2.826.0.1.3680043.8.498.1"
    sources = [make_cxr(study_uid=study, rows=64, cols=64, seed=i) for i in range(2)]
    v1, v2 = make_model("2024.05.1"), make_model("2024.06.1")

    first = build_sr(make_result(sources, [0.2, 0.9], model=v1))
    again = build_sr(make_result(sources, [0.2, 0.9], model=v1))
    newer = build_sr(make_result(sources, [0.2, 0.9], model=v2))
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert first.SeriesNumber == again.SeriesNumber
    assert newer.SOPInstanceUID != first.SOPInstanceUID
    assert newer.SeriesInstanceUID != first.SeriesInstanceUID
    assert _device_uid_in(first) == _device_uid_in(again) == identity.device_uid(
        v1.version, v1.sha256)
    assert _device_uid_in(newer) != _device_uid_in(first)

    sc1 = build_heatmap_sc(scored(sources[0], 0.2), v1)
    sc2 = build_heatmap_sc(scored(sources[0], 0.2), v1)
    sc_other = build_heatmap_sc(scored(sources[1], 0.9), v1)
    assert sc1.SOPInstanceUID == sc2.SOPInstanceUID != sc_other.SOPInstanceUID
    assert sc1.SeriesInstanceUID == sc_other.SeriesInstanceUID != first.SeriesInstanceUID
