"""docs/conformance.md says what the running listener and the sender actually do: each
documented transfer syntax is negotiated over a real association with the real listener,
the refused ones are refused, and the sender's proposals match the table."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import UID
from pynetdicom import AE

from db.settings import Settings
from dicom_node.listener import STORE_TRANSFER_SYNTAXES, NodeHandle, start_node
from dicom_node.sender import LOSSLESS, SR_CLASSES, UNCOMPRESSED, proposals
from dicom_node.sr import build_sr
from tests.support.dicom_factory import make_cxr
from tests.support.results_factory import make_model, make_result, scored

DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(title)
    rest = text[start + len(title):]
    end = re.search(r"^#{1,4} ", rest, flags=re.M)
    return rest[: end.start()] if end else rest


def _uids(section: str) -> list[str]:
    return re.findall(r"`(1\.2\.840\.10008\.[0-9.]+)`", section)


@pytest.fixture
def node(settings: Settings) -> Iterator[NodeHandle]:
    handle = start_node(settings.replace(port=0, bind_address="127.0.0.1", min_free_mb=1,
                                         allowed_callers=("CONFORMANCE",)),
                        run_stability=False)
    yield handle
    handle.stop()


def _negotiate(node: NodeHandle, syntaxes: list[str]) -> dict[str, bool]:
    """Propose CR Image Storage once per syntax; which were accepted."""
    ae = AE(ae_title="CONFORMANCE")
    for ts in syntaxes:
        ae.add_requested_context(CR_STORAGE, [ts])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXR_TRIAGE")
    try:
        contexts = assoc.accepted_contexts + assoc.rejected_contexts
        return {str(cx.transfer_syntax[0]): cx in assoc.accepted_contexts
                for cx in contexts}
    finally:
        if assoc.is_established:
            assoc.release()


def test_documented_accepted_syntaxes_are_exactly_what_the_listener_accepts(
        node: NodeHandle) -> None:
    documented = _uids(_section("#### Transfer syntaxes accepted"))
    assert sorted(documented) == sorted(STORE_TRANSFER_SYNTAXES)
    refused = _uids(_section("#### Transfer syntaxes refused"))
    assert refused == ["1.2.840.10008.1.2.2"]  # Explicit VR Big Endian, stated refused
    # Over a real association (at most 128 contexts; 13 here).
    result = _negotiate(node, documented + refused)
    assert {ts for ts, ok in result.items() if ok} == set(documented)
    assert {ts for ts, ok in result.items() if not ok} == set(refused)


def test_documented_proposals_are_what_the_sender_proposes(tmp_path: Path) -> None:
    from dicom_node.results import write_dataset
    from dicom_node.sc import build_heatmap_sc
    from dicom_node.sender import read_header

    source = make_cxr(rows=64, cols=64)
    sr = write_dataset(build_sr(make_result([source])), tmp_path)
    sc = write_dataset(build_heatmap_sc(scored(source, 0.5), make_model()), tmp_path)
    proposed = proposals([read_header(sr), read_header(sc)])
    table = _section("#### Presentation contexts proposed")
    rows = {m.group(1): m.group(2) for m in
            re.finditer(r"^\| [^`|]+`([0-9.]+)` \| ([^|]+) \|$", table, flags=re.M)}
    proposed_classes = {str(cls) for cls, _ in proposed}
    assert set(rows) == proposed_classes == {*map(str, SR_CLASSES), SECONDARY_CAPTURE}
    for cls, syntaxes in proposed:
        names = [UID(ts).name for ts in syntaxes]
        described = rows[str(cls)]
        for ts in syntaxes:
            short = {"Explicit VR Little Endian": "Explicit VR LE",
                     "Implicit VR Little Endian": "Implicit VR LE",
                     "JPEG-LS Lossless Image Compression": "JPEG-LS Lossless",
                     "JPEG 2000 Image Compression (Lossless Only)": "JPEG 2000 Lossless",
                     "RLE Lossless": "RLE Lossless"}[UID(ts).name]
            assert short in described, (cls, names, described)
    sc_syntaxes = [list(s) for c, s in proposed if str(c) == SECONDARY_CAPTURE]
    assert sc_syntaxes == [[ts] for ts in LOSSLESS] + [list(UNCOMPRESSED)]
