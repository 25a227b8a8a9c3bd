"""The values inside :class:`db.settings.Settings` that are more than a scalar, and the
reading of raw config values (TOML, ``CXR_*`` text) into typed ones.

Every function here raises :class:`SettingsError` with one line naming the setting.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """The operator's configuration is invalid (operator's fault)."""


@dataclass(frozen=True)
class Destination:
    """A DICOM peer written ``AE@host:port``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        text = text.strip()
        try:
            ae, rest = text.split("@", 1)
            host, port = rest.rsplit(":", 1)
            dest = cls(ae.strip(), host.strip(), int(port))
        except ValueError as exc:
            raise SettingsError(f"destination {text!r} is not of the form AE@host:port") from exc
        if not dest.ae_title or len(dest.ae_title) > 16 or not dest.host:
            raise SettingsError(f"destination {text!r} has an invalid AE title or host")
        return dest

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


#: The header attributes a selection rule may test.
RULE_ATTRIBUTES = ("Modality", "ViewPosition", "BodyPartExamined", "SOPClassUID")


@dataclass(frozen=True, eq=False)
class SelectionRule(Mapping[str, Any]):
    """One selection rule, checked at load: a name, attribute lists, ``single_image_only``.

    An attribute left out accepts any value; an unknown key or a value that is not a list
    of strings is a :class:`SettingsError`, so a typo can never match everything.  It
    reads like the dict it was written as (``rule["Modality"]``, ``rule.get("name")``).
    """

    name: str
    attributes: tuple[tuple[str, tuple[str, ...]], ...]
    single_image_only: bool = False

    @classmethod
    def parse(cls, raw: Any, index: int = 0) -> SelectionRule:
        if isinstance(raw, SelectionRule):
            return raw
        where = f"selection_rules[{index}]"
        if not isinstance(raw, Mapping):
            raise SettingsError(f"{where} must be an object, not {type(raw).__name__}")
        unknown = sorted(set(raw) - {"name", "single_image_only", *RULE_ATTRIBUTES})
        if unknown:
            raise SettingsError(f"{where}: unknown key {unknown[0]!r} (allowed: name, "
                                f"single_image_only, {', '.join(RULE_ATTRIBUTES)})")
        name = raw.get("name", f"rule {index + 1}")
        if not isinstance(name, str) or not name.strip():
            raise SettingsError(f"{where}: name must be a non-empty string")
        single = raw.get("single_image_only", False)
        if not isinstance(single, bool):
            raise SettingsError(f"{where}: single_image_only must be true or false")
        attributes: list[tuple[str, tuple[str, ...]]] = []
        for key in RULE_ATTRIBUTES:
            if key not in raw:
                continue
            values = raw[key]
            if not isinstance(values, list | tuple) or not values or \
                    not all(isinstance(v, str) for v in values):
                raise SettingsError(f"{where}: {key} must be a non-empty list of strings, "
                                    f"not {values!r}")
            attributes.append((key, tuple(v.strip() for v in values)))
        return cls(name.strip(), tuple(attributes), single)

    def _as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        out.update({key: list(values) for key, values in self.attributes})
        if self.single_image_only:
            out["single_image_only"] = True
        return out

    def __getitem__(self, key: str) -> Any:
        return self._as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._as_dict())

    def __len__(self) -> int:
        return len(self._as_dict())


_DEFAULT_RULE_DICTS: tuple[dict[str, Any], ...] = (
    # Each rule scores an instance when every listed attribute matches one of its values.
    # "" matches an absent or empty attribute.  "single_image_only" accepts the rule only
    # where the study holds a single image, so an unlabelled lateral view in a two-view
    # study is never scored by guesswork.
    {
        "name": "frontal CR/DX",
        "Modality": ["CR", "DX"],
        "ViewPosition": ["PA", "AP"],
        "BodyPartExamined": ["CHEST", "THORAX", ""],
    },
    {
        "name": "CR/DX without view on a single-image study",
        "Modality": ["CR", "DX"],
        "ViewPosition": [""],
        "BodyPartExamined": ["CHEST", "THORAX", ""],
        "single_image_only": True,
    },
    {
        "name": "frontal chest secondary capture",
        "Modality": ["OT", "SC"],
        "BodyPartExamined": ["CHEST", "THORAX"],
        "ViewPosition": ["PA", "AP"],
    },
    {
        "name": "chest secondary capture without view on a single-image study",
        "Modality": ["OT", "SC"],
        "BodyPartExamined": ["CHEST", "THORAX"],
        "ViewPosition": [""],
        "single_image_only": True,
    },
)
DEFAULT_SELECTION_RULES: tuple[SelectionRule, ...] = tuple(
    SelectionRule.parse(r, i) for i, r in enumerate(_DEFAULT_RULE_DICTS))


def coerce(name: str, kind: Any, raw: Any) -> Any:
    """Turn a raw value from env or TOML into the type ``kind`` of setting ``name``, or
    raise SettingsError."""
    try:
        if name == "pacs":
            items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
            return tuple(
                i if isinstance(i, Destination) else Destination.parse(str(i))
                for i in items
                if str(i).strip()
            )
        if name == "selection_rules":
            rules = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(rules, list | tuple):
                raise SettingsError("selection_rules must be a JSON list of objects")
            return tuple(SelectionRule.parse(r, i) for i, r in enumerate(rules))
        if name == "split_fractions":
            parts = raw if isinstance(raw, list | tuple) else str(raw).split(",")
            fr = tuple(float(p) for p in parts)
            if len(fr) != 3 or abs(sum(fr) - 1.0) > 1e-6 or min(fr) <= 0:
                raise SettingsError("split_fractions must be three positive numbers summing to 1")
            return fr
        if name == "allowed_callers":
            items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
            return tuple(str(i).strip() for i in items if str(i).strip())
        if kind in (Path, "Path"):
            return Path(raw)
        if kind in (Path | None, "Path | None"):
            return Path(raw) if raw not in (None, "") else None
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise SettingsError(f"{name}: {raw!r} is not a boolean")
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise SettingsError(f"setting {name}: {raw!r} is not a whole number")
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise SettingsError(f"setting {name}: {raw!r} is not a number")
            value = float(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise SettingsError(f"setting {name}: {raw!r} is not a finite number")
            return value
        return str(raw)
    except SettingsError:
        raise
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name}: cannot read {raw!r}: {exc}") from exc


VIEWER_FIELDS = ("study_uid", "accession_number")


def check_viewer_template(template: str) -> None:
    """An http(s) URL whose only placeholders are ``{study_uid}`` and
    ``{accession_number}`` (filled in URL-encoded by the web page)."""
    if not template:
        return
    if not template.startswith(("https://", "http://")):
        raise SettingsError(f"viewer_url_template {template!r} must start with http(s)://")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise SettingsError(f"viewer_url_template {template!r}: {exc}") from exc
    unknown = [f for f in fields if f not in VIEWER_FIELDS]
    if unknown:
        raise SettingsError(f"viewer_url_template: unknown placeholders {unknown}; "
                            f"allowed: {', '.join(VIEWER_FIELDS)}")
