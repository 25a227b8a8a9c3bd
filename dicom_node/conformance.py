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
from copy import deepcopy
from typing import Any

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

from db.errors import BadInputError

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


# Single-byte repertoires with code extensions, and the same repertoire without (PS3.3
# C.12.1.1.2, Tables C.12-2 and C.12-3): alone, "ISO 2022 IR 100" means "ISO_IR 100".
_EXTENSION_TO_PLAIN = {
    f"ISO 2022 IR {n}": f"ISO_IR {n}"
    for n in (100, 101, 109, 110, 144, 127, 126, 138, 148, 203, 13, 166)
}
_DEFAULT_REPERTOIRE = "ISO 2022 IR 6"
_MULTI_BYTE_EXTENSIONS = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159",
                                    "ISO 2022 IR 149", "ISO 2022 IR 58"})

# Stands in for a legal Specific Character Set that highdicom refuses even normalised
# (it lacks ISO 2022 IR 149 and 58): every value is a Python string until pydicom encodes
# it on writing, with the source's own value that :func:`restore_source_text` puts back.
BUILD_CHARSET = "ISO_IR 192"

# Text of the Patient and Study modules that our objects copy from their source: written
# back as the source's own element, so its bytes (escape sequences, trailing delimiters)
# stay exactly as the modality wrote them.
_VERBATIM = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientNames",
    "PatientBirthName", "PatientMotherBirthName", "PatientComments",
    "ReferringPhysicianName", "StudyDescription", "AccessionNumber", "StudyID",
})


def normalise_charset(value: Any) -> list[str] | str | None:
    """Specific Character Set in the form the standard defines and highdicom accepts.

    - an empty first value (``\\ISO 2022 IR 87``) is the default repertoire with code
      extensions: it becomes ``ISO 2022 IR 6`` (PS3.3 C.12.1.1.2);
    - the default repertoire alone (``ISO 2022 IR 6``, or empty values) is no value;
    - a multi-byte set alone is switched to from the default repertoire;
    - one single-byte repertoire with code extensions and nothing to switch to is that
      repertoire without them (``ISO 2022 IR 100`` -> ``ISO_IR 100``);
    - values are stripped of padding; anything else is kept as it is.
    """
    if value is None:
        return None
    values = [str(v).strip() for v in _values(value)]
    if not values or all(v == "" for v in values):
        return None
    if len(values) > 1 and values[0] == "":
        values[0] = _DEFAULT_REPERTOIRE
    values = [v for i, v in enumerate(values) if v or i == 0]
    if len(values) == 1:
        only = values[0]
        if only in ("", _DEFAULT_REPERTOIRE, "ISO_IR 6"):
            return None
        if only in _MULTI_BYTE_EXTENSIONS:
            return [_DEFAULT_REPERTOIRE, only]
        return _EXTENSION_TO_PLAIN.get(only, only)
    return values


def _highdicom_accepts(charset: str | list[str]) -> bool:
    from highdicom.valuerep import _check_specific_character_set

    try:
        _check_specific_character_set(charset)
    except ValueError:
        return False
    return True


def build_charset(header: Dataset) -> str | list[str] | None:
    """The Specific Character Set to hand highdicom for ``header``: its own where
    highdicom accepts it, else its normalised form (:func:`normalise_charset`), else
    :data:`BUILD_CHARSET`.  Never fails."""
    value = header.get("SpecificCharacterSet")
    if value is None:
        return None
    charset = list(value) if isinstance(value, MultiValue) else str(value)
    if _highdicom_accepts(charset):
        return charset
    normalised = normalise_charset(value)
    if normalised is None or _highdicom_accepts(normalised):
        return normalised
    return BUILD_CHARSET


def restore_source_text(built: Dataset, header: Dataset) -> None:
    """Give ``built`` the source's own Specific Character Set and copied text back.

    The source's value is kept as it was, an empty first value included: it is legal,
    and Orthanc, for one, decodes ``\\ISO 2022 IR 87`` but not ``ISO 2022 IR 6\\ISO 2022
    IR 87``.  The Patient and Study text elements are the source's, byte for byte.
    """
    if "SpecificCharacterSet" in header:
        built.SpecificCharacterSet = header.SpecificCharacterSet
    elif "SpecificCharacterSet" in built:
        del built.SpecificCharacterSet
    for elem in header:
        if elem.keyword in _VERBATIM and elem.keyword in built:
            built[elem.tag] = deepcopy(elem)


def copy_laterality(built: Dataset, header: Dataset) -> None:
    """Laterality and Body Part Examined of every object we derive from a source.

    Laterality is Type 2C in General Series: needed for paired body parts.  With a known
    (unpaired) body part such as the chest it stays out; without a body part it is present
    and empty, unless the source states a side.  A side is never guessed.
    """
    if header.get("Laterality"):
        built.Laterality = header.Laterality
    if header.get("BodyPartExamined"):
        built.BodyPartExamined = header.BodyPartExamined
    elif "Laterality" not in built:
        built.Laterality = None


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
    "BUILD_CHARSET",
    "build_charset",
    "no_person_name_warnings",
    "normalise_charset",
    "restore_source_text",
    "REQUIRED_UIDS",
    "TYPE2_PATIENT_STUDY",
    "sanitise_source",
    "value_is_valid",
]
