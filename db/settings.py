"""Typed settings for every cxr-triage process.

One frozen object, built by :func:`load_settings` from ``CXR_*`` environment variables,
an optional TOML config file (``CXR_CONFIG``) and explicit overrides, in rising order of
precedence.  Code receives a :class:`Settings`; nothing reads the environment elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "CXR_"


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


DEFAULT_SELECTION_RULES: tuple[dict[str, Any], ...] = (
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


@dataclass(frozen=True)
class Settings:
    """Every setting of cxr-triage.  Field names map to ``CXR_<NAME>`` variables."""

    data_dir: Path = Path("./cxr-data")
    database_url: str = ""  # empty: SQLite file under data_dir
    broker_url: str = ""  # empty: embedded filesystem broker under data_dir
    result_backend: str = ""  # empty: no result backend (results live in the database)

    # DICOM listener
    ae_title: str = "CXR_TRIAGE"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    allowed_callers: tuple[str, ...] = ("STORESCU", "ORTHANC", "CXR_DEMO")
    max_associations: int = 16
    max_pdu: int = 131072
    stable_seconds: float = 30.0
    min_free_mb: int = 500
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Listener scaling (issue 15): processes accepting on one port (SO_REUSEPORT) under one
    # supervisor; 1 runs the listener in a single process without a supervisor.
    listener_processes: int = 1

    # Scheduling and Celery
    inference_queue: str = "inference"
    delivery_queue: str = "delivery"
    visibility_timeout: int = 7200
    task_max_retries: int = 5
    scheduler_interval: float = 2.0
    reconcile_after_seconds: float = 900.0
    max_analysis_attempts: int = 5

    # Scoring
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    heatmap_method: str = "gradcam"  # gradcam or occlusion
    occlusion_size: int = 32
    occlusion_stride: int = 16
    occlusion_batch: int = 64
    selection_rules: tuple[dict[str, Any], ...] = DEFAULT_SELECTION_RULES

    # Delivery
    pacs: tuple[Destination, ...] = ()
    delivery_ae_title: str = "CXR_TRIAGE"
    delivery_deadline_seconds: float = 3 * 24 * 3600.0
    delivery_backoff_seconds: float = 10.0
    delivery_backoff_max_seconds: float = 600.0
    not_analysed_report: bool = False
    institution_name: str = ""
    manufacturer: str = "cxr-triage"

    # Trainer
    target_sensitivity: float = 0.98
    promotion_auc_margin: float = 0.01
    promotion_specificity_margin: float = 0.02
    min_new_labels: int = 20
    split_key: str = "cxr-triage-split-v1"
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    backbone: str = "efficientnet_lite0"
    input_size: int = 320
    train_contrast: str = "clahe"  # none, clahe or equalize
    train_cutoff: str = "block15"  # stages before this one stay frozen (features cached)
    train_views: int = 3  # cached views per training image: 1 plain + augmented ones
    train_balance: str = "class"  # class, or source_class (every source/class cell equal)
    epochs: int = 8
    batch_size: int = 16
    seed: int = 1234

    # Operations
    metrics_port: int = 0  # 0: no metrics endpoint
    web_port: int = 8080
    log_level: str = "INFO"

    # ----- derived paths -------------------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def heatmaps_dir(self) -> Path:
        return self.data_dir / "heatmaps"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'cxr-triage.db').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def uses_embedded_broker(self) -> bool:
        return not self.broker_url or self.broker_url.startswith("filesystem://")

    def ensure_dirs(self) -> None:
        for path in (
            self.data_dir,
            self.spool_dir,
            self.models_dir,
            self.heatmaps_dir,
            self.outbox_dir,
            self.reports_dir,
        ):
            path.mkdir(parents=True, exist_ok=True)
        if self.uses_embedded_broker:
            for sub in ("in", "processed", "control"):
                (self.broker_dir / sub).mkdir(parents=True, exist_ok=True)

    def replace(self, **changes: Any) -> Settings:
        return load_settings(env={}, base=self, overrides=changes)

    def public_dict(self) -> dict[str, Any]:
        """Settings as plain JSON values, with secrets in URLs masked."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) if isinstance(v, Destination) else v for v in value]
            if f.name.endswith("_url") and isinstance(value, str) and "@" in value:
                scheme, _, rest = value.partition("://")
                value = f"{scheme}://***@{rest.split('@', 1)[1]}"
            out[f.name] = value
        return out


_FIELD_TYPES: dict[str, Any] = {}


def _field_types() -> dict[str, Any]:
    if not _FIELD_TYPES:
        _FIELD_TYPES.update(get_type_hints(Settings))
    return _FIELD_TYPES


def _coerce(name: str, raw: Any) -> Any:
    """Turn a raw value from env or TOML into the field's type, or raise SettingsError."""
    kind = _field_types()[name]
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
            if not isinstance(rules, list | tuple) or not all(isinstance(r, dict) for r in rules):
                raise SettingsError("selection_rules must be a JSON list of objects")
            return tuple(dict(r) for r in rules)
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
            return int(raw)
        if kind is float:
            return float(raw)
        return str(raw)
    except SettingsError:
        raise
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name}: cannot read {raw!r}: {exc}") from exc


def _validate(s: Settings) -> None:
    if not s.ae_title or len(s.ae_title) > 16:
        raise SettingsError(f"ae_title {s.ae_title!r} must be 1 to 16 characters")
    if not 0 <= s.port <= 65535:
        raise SettingsError(f"port {s.port} is out of range")
    if s.heatmap_method not in ("gradcam", "occlusion"):
        raise SettingsError(f"heatmap_method {s.heatmap_method!r} must be gradcam or occlusion")
    if s.max_associations < 1:
        raise SettingsError("max_associations must be at least 1")
    if not 1 <= s.listener_processes <= 64:
        raise SettingsError("listener_processes must be between 1 and 64")
    if not 0.0 < s.target_sensitivity < 1.0:
        raise SettingsError("target_sensitivity must lie strictly between 0 and 1")
    if s.train_contrast not in ("none", "clahe", "equalize"):
        raise SettingsError(f"train_contrast {s.train_contrast!r} must be none, clahe or equalize")
    if s.train_balance not in ("class", "source_class"):
        raise SettingsError(f"train_balance {s.train_balance!r} must be class or source_class")
    if s.train_views < 1:
        raise SettingsError("train_views must be at least 1")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise SettingsError("tls_cert and tls_key must be given together")


def load_settings(
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: Settings | None = None,
) -> Settings:
    """Build settings from a config file, ``CXR_*`` variables and overrides.

    ``env`` defaults to ``os.environ``; tests pass their own mapping.  ``CXR_CONFIG`` in
    ``env`` names a TOML file whose top-level keys are setting names.
    """
    env = os.environ if env is None else env
    names = {f.name for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    env_config = env.get(f"{ENV_PREFIX}CONFIG")
    config_path = config_file or (Path(env_config) if env_config else None)
    if config_path is not None:
        try:
            data = tomllib.loads(config_path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read config file {config_path}: {exc}") from exc
        for key, raw in data.items():
            if key not in names:
                raise SettingsError(f"config file {config_path}: unknown setting {key!r}")
            values[key] = _coerce(key, raw)
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == f"{ENV_PREFIX}CONFIG":
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in names:
            raise SettingsError(f"unknown setting {key}")
        values[name] = _coerce(name, raw)
    for key, raw in (overrides or {}).items():
        if key not in names:
            raise SettingsError(f"unknown setting {key!r}")
        values[key] = _coerce(key, raw) if raw is not None or key.startswith("tls_") else raw
    settings = dataclasses.replace(base or Settings(), **values)
    _validate(settings)
    return settings


def setting_names() -> list[str]:
    """All setting names, for documentation checks."""
    return [f.name for f in dataclasses.fields(Settings)]


__all__ = [
    "Destination",
    "Settings",
    "SettingsError",
    "load_settings",
    "setting_names",
    "DEFAULT_SELECTION_RULES",
]
