"""Which instances of a study are scored, as data rather than code.

Rules come from ``settings.selection_rules`` (see ``db.settings.DEFAULT_SELECTION_RULES``).
A rule is a dict: ``name``, then attribute names (``Modality``, ``ViewPosition``,
``BodyPartExamined``, ``SOPClassUID``) each mapped to a list of accepted values, where
``""`` accepts an absent or empty attribute; ``single_image_only: true`` accepts the
instance only where the study holds one image.  Values compare case-insensitively.

An instance is scored when any rule matches.  Before the rules, objects that cannot be
radiographs (structured reports, presentation states, anything without pixel data) are
skipped, and every skip carries a human-readable reason.  Selection works on headers
alone (``dcmread(stop_before_pixels=True)``), dicts, or any object with those attributes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.uid import UID

RULE_KEYS = ("Modality", "ViewPosition", "BodyPartExamined", "SOPClassUID")
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "LLO", "RLO")
# Pixel-less or non-image object families, by SOP class prefix.
NON_IMAGE_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, segmentation-like
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.481.",  # radiotherapy objects
)
NON_IMAGE_MODALITIES = ("SR", "PR", "KO", "DOC", "REG", "SEG", "RWV", "PLAN")


@dataclass(frozen=True)
class Selection:
    """The verdict on one instance: scored, or skipped for ``reason``."""

    index: int
    scored: bool
    reason: str | None = None
    rule: str | None = None


def _get(header: Any, key: str) -> Any:
    if isinstance(header, Mapping):
        return header.get(key)
    return getattr(header, key, None) if not hasattr(header, "get") else header.get(key)


def _text(header: Any, key: str) -> str:
    value = _get(header, key)
    if value is None:
        return ""
    return str(value).strip()


def _has_pixels(header: Any) -> bool | None:
    """True/False where known; None where the header cannot tell (e.g. a plain dict)."""
    for key in ("has_pixels", "HasPixelData"):
        value = _get(header, key)
        if value is not None:
            return bool(value)
    if isinstance(header, Mapping):
        if "PixelData" in header:
            return True
        return None if "Rows" not in header else bool(_get(header, "Rows"))
    rows = _get(header, "Rows")
    if rows is not None:
        return bool(rows)
    return False if _text(header, "SOPClassUID") else None


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return name if name and name != uid else (uid or "unknown")


def _not_an_image(header: Any) -> str | None:
    sop = _text(header, "SOPClassUID")
    modality = _text(header, "Modality").upper()
    if sop.startswith(NON_IMAGE_CLASS_PREFIXES) or modality in NON_IMAGE_MODALITIES:
        return f"not an image (SOP class {_sop_class_name(sop)})"
    if _has_pixels(header) is False:
        return f"not an image (no pixel data; SOP class {_sop_class_name(sop)})"
    return None


def _not_for_presentation(header: Any) -> str | None:
    """DX/MG/IO images "For Processing" are raw detector data, not what the model learned."""
    intent = _text(header, "PresentationIntentType").upper()
    if intent and intent != "FOR PRESENTATION":
        return f"not for presentation (PresentationIntentType {intent})"
    return None


def _matches(rule: Mapping[str, Any], header: Any, image_count: int) -> bool:
    if rule.get("single_image_only") and image_count != 1:
        return False
    for key in RULE_KEYS:
        if key not in rule:
            continue
        accepted = {str(v).strip().upper() for v in rule[key]}
        if _text(header, key).upper() not in accepted:
            return False
    return True


def _describe_skip(header: Any, image_count: int) -> str:
    """Why no rule matched, in the words a radiographer would use."""
    modality = _text(header, "Modality") or "(none)"
    view = _text(header, "ViewPosition")
    body = _text(header, "BodyPartExamined")
    if view.upper() in LATERAL_VIEWS:
        return f"lateral view (ViewPosition {view})"
    if modality.upper() not in ("CR", "DX") and body.upper() not in ("CHEST", "THORAX"):
        return f"not a chest image (Modality {modality}, BodyPartExamined {body or '(none)'})"
    if body and body.upper() not in ("CHEST", "THORAX"):
        return f"not a chest image (Modality {modality}, BodyPartExamined {body})"
    if not view:
        return (f"no ViewPosition on a study of {image_count} images "
                f"(Modality {modality}): frontal view not established")
    return f"not a frontal view (ViewPosition {view}, Modality {modality})"


def image_count(headers: Sequence[Any]) -> int:
    """How many instances of a study are images (not SR, PR, or pixel-less objects)."""
    return sum(1 for h in headers if _not_an_image(h) is None)


def select_instances(
    headers: Sequence[Any],
    rules: Sequence[Mapping[str, Any]],
    study_image_count: int | None = None,
) -> list[Selection]:
    """One :class:`Selection` per header, in order.

    ``study_image_count`` defaults to the images among ``headers``; pass it when the
    headers are a subset of the study.
    """
    count = image_count(headers) if study_image_count is None else study_image_count
    out: list[Selection] = []
    for index, header in enumerate(headers):
        reason = _not_an_image(header) or _not_for_presentation(header)
        if reason is not None:
            out.append(Selection(index, False, reason, None))
            continue
        rule = next((r for r in rules if _matches(r, header, count)), None)
        if rule is not None:
            out.append(Selection(index, True, None, str(rule.get("name", "unnamed rule"))))
        else:
            out.append(Selection(index, False, _describe_skip(header, count), None))
    return out


__all__ = ["Selection", "image_count", "select_instances"]
