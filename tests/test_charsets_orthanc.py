"""Every character set through a real Orthanc: sources encoded as in the standard's own
examples (PS3.5 Annexes H, I, J, K), our SR and SC built from them, sent, and read back,
by Orthanc's decoder and by the raw bytes it stores."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from db.settings import Destination
from dicom_node.conformance import normalise_charset
from dicom_node.results import write_dataset
from dicom_node.sc import build_heatmap_sc
from dicom_node.sender import send_file
from dicom_node.sr import build_sr
from tests.support.dicom_factory import make_cxr, write
from tests.support.results_factory import make_model, make_result, scored

_PLACEHOLDER = "PLACEHOLDER^NAME"

# (Specific Character Set, Patient's Name as encoded bytes, what it reads as)
CASES: dict[str, tuple[list[str] | str, bytes, str]] = {
    # PS3.5 H.3.1: Japanese, empty first value, JIS X 0208 (IR 87)
    "japanese-ir87": (
        ["", "ISO 2022 IR 87"],
        b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^"
        b"\x1b$B$?$m$&\x1b(B",
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
    ),
    # PS3.5 H.3.2: Japanese, half-width katakana (IR 13) with kanji (IR 87)
    "japanese-ir13-ir87": (
        ["ISO 2022 IR 13", "ISO 2022 IR 87"],
        b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3=\x1b$B;3ED\x1b(J^\x1b$BB@O:\x1b(J="
        b"\x1b$B$d$^$@\x1b(J^\x1b$B$?$m$&\x1b(J",
        "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
    ),
    # PS3.5 I.2: Korean, empty first value, KS X 1001 (IR 149)
    "korean-ir149": (
        ["", "ISO 2022 IR 149"],
        b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7=\x1b$)C\xc8\xab^"
        b"\x1b$)C\xb1\xe6\xb5\xbf",
        "Hong^Gildong=洪^吉洞=홍^길동",
    ),
    # PS3.5 K.2: Chinese, empty first value, GB 2312 (IR 58)
    "chinese-ir58": (
        ["", "ISO 2022 IR 58"],
        b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\x1b$)A\xd0\xa1\xb6\xab=",
        "Zhang^XiaoDong=张^小东=",
    ),
    # PS3.5 J.1: Chinese, GB18030
    "chinese-gb18030": (
        "GB18030",
        b"Wang^XiaoDong=\xcd\xf5^\xd0\xa1\xb6\xab=",
        "Wang^XiaoDong=王^小东=",
    ),
    "chinese-gbk": ("GBK", b"Wang^XiaoDong=\xcd\xf5^\xd0\xa1\xb6\xab=",
                    "Wang^XiaoDong=王^小东="),
    "utf-8": ("ISO_IR 192", "Wang^XiaoDong=王^小东=".encode(), "Wang^XiaoDong=王^小东="),
    "default-with-extensions-only": ("ISO 2022 IR 6", b"Doe^John", "Doe^John"),
}


def _source_with_raw_name(charset: list[str] | str, name: bytes, path: Path) -> Path:
    """A chest phantom whose Patient's Name is exactly ``name`` on disk."""
    ds = make_cxr(rows=64, cols=64, patient_name=_PLACEHOLDER, study_uid=generate_uid())
    ds.SpecificCharacterSet = charset
    write(ds, path)
    data = path.read_bytes()
    old = _PLACEHOLDER.encode()
    padded = name + (b" " if len(name) % 2 else b"")
    marker = b"PN" + struct.pack("<H", len(old)) + old
    assert data.count(marker) == 1
    path.write_bytes(data.replace(marker, b"PN" + struct.pack("<H", len(padded)) + padded))
    return path


def _raw_name(data: bytes) -> bytes:
    """The stored bytes of (0010,0010), as they are on disk."""
    ds = pydicom.dcmread(io.BytesIO(data))
    raw = ds.get_item(0x00100010)
    assert raw is not None
    return bytes(raw.value).rstrip(b" ").rstrip(b"=")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
        (["", "ISO 2022 IR 149"], ["ISO 2022 IR 6", "ISO 2022 IR 149"]),
        (["ISO 2022 IR 13", "ISO 2022 IR 87"], ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
        ("ISO 2022 IR 87", ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
        ("ISO 2022 IR 6", None),
        ("", None),
        (["", ""], None),
        ("ISO 2022 IR 100", "ISO_IR 100"),
        ("GB18030", "GB18030"),
        ("ISO_IR 192", "ISO_IR 192"),
    ],
)
def test_specific_character_set_is_normalised_the_standards_way(
        value: Any, expected: Any) -> None:
    assert normalise_charset(value) == expected


@pytest.mark.orthanc
@pytest.mark.parametrize("case", sorted(CASES))
def test_names_in_every_character_set_survive_orthanc(  # type: ignore[no-untyped-def]
        orthanc_factory, tmp_path: Path, case: str) -> None:
    charset, raw, text = CASES[case]
    orthanc = orthanc_factory()
    source_path = _source_with_raw_name(charset, raw, tmp_path / "source.dcm")
    source = pydicom.dcmread(source_path)
    orthanc.upload(source_path)
    source_id = orthanc.post("/tools/lookup", raw=source.SOPInstanceUID.encode())[0]["ID"]
    source_name = orthanc.get(f"/instances/{source_id}/simplified-tags")["PatientName"]
    destination = Destination(orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    model = make_model()
    outputs = [build_sr(make_result([source], [0.7], model=model)),
               build_heatmap_sc(scored(source, 0.7), model)]
    for built in outputs:
        path = write_dataset(built, tmp_path / "out")
        outcome = send_file(path, destination, "CXR_TRIAGE", timeout=20)
        assert outcome.ok, outcome.reason
        hit = orthanc.post("/tools/lookup", raw=str(built.SOPInstanceUID).encode())[0]
        tags = orthanc.get(f"/instances/{hit['ID']}/simplified-tags")
        # Orthanc's own decoder reads the same name in our object as in the source (an
        # empty trailing component group, "=", is not kept: pydicom drops it).
        assert tags["PatientName"] == source_name.rstrip("=")
        stored = orthanc.get(f"/instances/{hit['ID']}/file")
        # The very bytes of the name, and a character set that reads them.
        assert _raw_name(stored) == raw.rstrip(b"=")
        back = pydicom.dcmread(io.BytesIO(stored))
        # The source's own value, an empty first value included: legal, and the form
        # Orthanc decodes (it does not decode "ISO 2022 IR 6\\ISO 2022 IR 87").
        assert back.SpecificCharacterSet == source.SpecificCharacterSet
        if "\x1b$)A" not in str(back.PatientName):  # pydicom keeps IR 58's escapes
            assert str(back.PatientName).rstrip("=") == text.rstrip("=")
