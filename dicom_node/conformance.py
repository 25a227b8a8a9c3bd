"""Make real-world source headers safe to copy into our outputs.

Sources from the field are often not conformant: Type 2 attributes such as StudyDate or
AccessionNumber are missing, and values like a Patient's Age of ``81`` (instead of
``081Y``) break the value representation. highdicom validates what it is given and
dciodvfy checks what we send, so the builders work on a sanitised copy of each source's
headers:

- missing Type 2 Patient and Study attributes are added with empty values;
- invalid Type 2 values are emptied, invalid optional values are left out;
- each change is logged by tag keyword and SOP Instance UID, never with the value;
- nothing clinical is invented, and the source dataset itself is never modified.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

from dicom_node.errors import BadInputError

log = logging.getLogger(__name__)

# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1):
# they must be present in every object we write, empty where unknown.
TYPE2_PATIENT_STUDY: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

# Type 1 identity the outputs cannot be built without: wrong here is the sender's fault.
REQUIRED_UIDS: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)

# Enumerated values that a VR check alone does not catch.
_ENUMERATED: dict[str, frozenset[str]] = {
    "PatientSex": frozenset({"M", "F", "O", ""}),
}

# Binary numbers have no textual form to get wrong.
_BINARY_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT"})

# Never copied into a header-only copy: bulk data is not needed to reference an image.
_BULK_KEYWORDS = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData"})


def _values(value: Any) -> Iterable[Any]:
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def value_is_valid(elem: DataElement) -> bool:
    """Whether ``elem``'s value conforms to its VR (and enumerated values we know)."""
    if elem.VR == "SQ" or elem.value is None:
        return True
    if isinstance(elem.value, bytes | bytearray) and elem.VR not in ("UN",):
        # Undecoded binary VRs (OB, OW, ...) carry no text to check.
        return True
    if elem.VR in _BINARY_NUMERIC_VRS:
        return True
    try:
        for item in _values(elem.value):
            if elem.VR in ("IS", "DS"):
                item = str(item)  # pydicom's IS/DSfloat keep the original string
            validate_value(elem.VR, item, config.RAISE)
    except (ValueError, TypeError):
        return False
    allowed = _ENUMERATED.get(elem.keyword)
    return allowed is None or str(elem.value) in allowed


def sanitise_source(source: Dataset) -> Dataset:
    """A header-only copy of ``source`` that our builders and validators accept.

    Raises :class:`BadInputError` where the identifying UIDs are missing or invalid, since
    no output could reference such an image.
    """
    sop_uid = str(source.get("SOPInstanceUID", "?"))
    for keyword in REQUIRED_UIDS:
        elem = source.get(keyword)
        if elem is None or not str(elem) or not value_is_valid(source[keyword]):
            raise BadInputError(f"source {sop_uid} lacks a valid {keyword}")

    out = Dataset()
    if hasattr(source, "file_meta"):
        out.file_meta = source.file_meta
    for elem in source:
        if elem.keyword in _BULK_KEYWORDS or elem.tag.group == 0x7FE0:
            continue
        if elem.tag.element == 0 or elem.tag.group == 0x0002:
            continue  # group lengths and stray file meta do not belong in a dataset
        if elem.tag.is_private:
            continue  # private data of another vendor is not ours to forward
        if value_is_valid(elem):
            out.add(elem)
            continue
        if elem.keyword in TYPE2_PATIENT_STUDY:
            out.add_new(elem.tag, elem.VR, None)
            log.warning("emptied invalid Type 2 %s of source %s", elem.keyword, sop_uid)
        else:
            log.warning("left out invalid optional %s of source %s", elem.keyword, sop_uid)
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in out:
            setattr(out, keyword, None)
            log.info("added empty Type 2 %s for source %s", keyword, sop_uid)
    return out


@contextmanager
def no_person_name_warnings() -> Iterator[None]:
    """Silence highdicom's warning about single-component person names.

    Anonymised sources often carry such names, which are legal; the warning's text holds
    the patient's name, and patient names must never reach our logs.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*unlikely to represent the intended person name",
            category=UserWarning,
        )
        yield


__all__ = [
    "no_person_name_warnings",
    "REQUIRED_UIDS",
    "TYPE2_PATIENT_STUDY",
    "sanitise_source",
    "value_is_valid",
]
