"""Typed settings for every cxr-triage process.

One frozen object, built by :func:`load_settings` from defaults, an optional TOML config
file (``--config`` or ``CXR_CONFIG``), ``CXR_*`` environment variables and explicit
overrides (the command line), in rising order of precedence.  Every value is checked at
load: a bad one raises :class:`SettingsError` with one line naming the setting, and the
entry points turn that into exit code 2.  Code receives a :class:`Settings`; nothing reads
the environment elsewhere.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from db.settings_values import (
    DEFAULT_SELECTION_RULES,
    Destination,
    SelectionRule,
    SettingsError,
    check_viewer_template,
    coerce,
)

ENV_PREFIX = "CXR_"


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

    # Listener robustness: every read from a peer is bounded, and dead peers are noticed
    network_timeout: float = 120.0  # seconds one PDU read (or an idle association) may take
    acse_timeout: float = 30.0  # seconds for association negotiation
    dimse_timeout: float = 120.0  # seconds for a DIMSE message
    tcp_keepalive_seconds: int = 60  # idle seconds before TCP keepalive probes (0: off)

    # Scheduling and Celery
    inference_queue: str = "inference"
    delivery_queue: str = "delivery"
    visibility_timeout: int = 7200
    scheduler_interval: float = 2.0
    reconcile_after_seconds: float = 900.0
    # Tries of one study, whatever repeats it: Celery's retries after infrastructure
    # trouble and redeliveries after a lost worker share this one budget.
    max_analysis_attempts: int = 6

    # Scoring
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    heatmap_method: str = "gradcam"  # gradcam or occlusion
    occlusion_size: int = 32
    occlusion_stride: int = 16
    occlusion_batch: int = 64
    selection_rules: tuple[SelectionRule, ...] = DEFAULT_SELECTION_RULES

    # Delivery
    pacs: tuple[Destination, ...] = ()
    delivery_ae_title: str = "CXR_TRIAGE"
    delivery_deadline_seconds: float = 3 * 24 * 3600.0
    delivery_backoff_seconds: float = 10.0
    delivery_backoff_max_seconds: float = 600.0
    not_analysed_report: bool = False
    institution_name: str = ""
    manufacturer: str = "cxr-triage"
    # Optional viewer-native results (GSPS hotspot per image, KOS for positive studies)
    hotspot_presentation_state: bool = False
    key_object_for_positive: bool = False

    # Trainer
    target_sensitivity: float = 0.98
    promotion_auc_margin: float = 0.01
    promotion_specificity_margin: float = 0.02
    min_new_labels: int = 20
    # Promotion floor (every model, the first included; see trainer.promotion)
    promotion_min_test_per_class: int = 20
    promotion_min_auc_lower: float = 0.75
    promotion_min_specificity: float = 0.25
    promotion_requires_approval: bool = False
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

    # Web page access: a bearer token and/or basic credentials; required beyond localhost
    web_auth_token: str = ""
    web_auth_user: str = ""
    web_auth_password: str = ""
    log_level: str = "INFO"

    # Health that sees the pipeline, and the radiologists' study page
    health_max_queue_age_seconds: float = 1800.0  # older queued study: health turns red
    health_ping_timeout: float = 2.0  # seconds to wait for workers' ping replies
    viewer_url_template: str = ""  # e.g. https://pacs/viewer?StudyInstanceUID={study_uid}

    # ----- derived values ------------------------------------------------------------
    @property
    def any_caller(self) -> bool:
        """True where ``allowed_callers`` is the explicit ``*``: any calling AE may store."""
        return "*" in self.allowed_callers

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
                value = [str(v) if isinstance(v, Destination)
                         else dict(v) if isinstance(v, SelectionRule) else v for v in value]
            if f.name in ("web_auth_token", "web_auth_password") and value:
                value = "***"
            if f.name.endswith("_url") and isinstance(value, str) and "@" in value:
                scheme, _, rest = value.partition("://")
                value = f"{scheme}://***@{rest.split('@', 1)[1]}"
            out[f.name] = value
        return out


_FIELD_TYPES: dict[str, Any] = {}


def _coerce(name: str, raw: Any) -> Any:
    """``raw`` as the type of setting ``name``."""
    if not _FIELD_TYPES:
        _FIELD_TYPES.update(get_type_hints(Settings))
    return coerce(name, _FIELD_TYPES[name], raw)


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
#: Numbers that must be strictly positive (a zero timeout or interval would spin or hang).
_POSITIVE = ("network_timeout", "acse_timeout", "dimse_timeout", "scheduler_interval",
             "visibility_timeout", "max_pdu", "input_size", "epochs", "batch_size",
             "occlusion_size", "occlusion_stride", "occlusion_batch",
             "max_analysis_attempts")


#: Settings that were retired, with what took their place.
_RETIRED = {"task_max_retries": "max_analysis_attempts, the one budget of tries of a study"}


def _unknown(name: str, shown: str | None = None) -> str:
    """The error text for a setting name that does not exist (or no longer does)."""
    label = shown or repr(name)
    if name in _RETIRED:
        return f"setting {label} was retired: use {_RETIRED[name]}"
    return f"unknown setting {label}"


def _check_numbers(s: Settings) -> None:
    """No negative number anywhere (durations, sizes, counts), and positive where zero is
    meaningless; ports in range."""
    for f in dataclasses.fields(s):
        value = getattr(s, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if value < 0:
            raise SettingsError(f"{f.name} must not be negative (got {value})")
        if f.name in _POSITIVE and value <= 0:
            raise SettingsError(f"{f.name} must be greater than 0 (got {value})")
    if s.acse_timeout > s.network_timeout:
        # A stalled peer's association thread waits for its request this long: keep it
        # within the network timeout, so every slot comes back within that.
        raise SettingsError(f"acse_timeout {s.acse_timeout} must not exceed "
                            f"network_timeout {s.network_timeout}")
    for name in ("port", "web_port", "metrics_port"):
        value = getattr(s, name)
        if not 0 <= value <= 65535:
            raise SettingsError(f"{name} {value} is out of range 0-65535")
    for dest in s.pacs:
        if not 1 <= dest.port <= 65535:
            raise SettingsError(f"pacs destination {dest} has a port out of range 1-65535")


def _check_places(s: Settings) -> None:
    """The database URL parses, and the data dir is (or can become) a writable folder."""
    if s.database_url:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(s.database_url)
        except (ArgumentError, ValueError) as exc:
            raise SettingsError("database_url cannot be parsed as a database URL") from exc
    existing = s.data_dir
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise SettingsError(f"data_dir {s.data_dir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SettingsError(f"data_dir {s.data_dir}: {existing} is not writable")


def _check_callers(s: Settings) -> None:
    if not s.allowed_callers:
        raise SettingsError("allowed_callers is empty: name the calling AE titles, or '*' "
                            "to accept any caller")
    if "*" in s.allowed_callers and len(s.allowed_callers) > 1:
        raise SettingsError("allowed_callers: '*' accepts any caller and cannot be combined "
                            "with AE titles")
    for title in s.allowed_callers:
        if len(title) > 16 or "\\" in title or not title.isprintable():
            raise SettingsError(f"allowed_callers: {title!r} is not an AE title")


def _validate(s: Settings) -> None:
    if not s.ae_title or len(s.ae_title) > 16:
        raise SettingsError(f"ae_title {s.ae_title!r} must be 1 to 16 characters")
    _check_numbers(s)
    _check_places(s)
    _check_callers(s)
    if s.log_level.upper() not in _LOG_LEVELS:
        raise SettingsError(f"log_level {s.log_level!r} must be one of {', '.join(_LOG_LEVELS)}")
    if bool(s.web_auth_user) != bool(s.web_auth_password):
        raise SettingsError("web_auth_user and web_auth_password must be given together")
    if not _DEVICE_RE.fullmatch(s.device):
        raise SettingsError(f"device {s.device!r} must be auto, cpu, mps, cuda or cuda:N")
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
    if s.promotion_min_test_per_class < 0:
        raise SettingsError("promotion_min_test_per_class must be at least 0")
    for name in ("promotion_min_auc_lower", "promotion_min_specificity"):
        if not 0.0 <= getattr(s, name) <= 1.0:
            raise SettingsError(f"{name} must lie between 0 and 1")
    if s.train_views < 1:
        raise SettingsError("train_views must be at least 1")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise SettingsError("tls_cert and tls_key must be given together")
    if s.health_max_queue_age_seconds <= 0 or s.health_ping_timeout <= 0:
        raise SettingsError("health_max_queue_age_seconds and health_ping_timeout must be > 0")
    check_viewer_template(s.viewer_url_template)


def load_settings(
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: Settings | None = None,
) -> Settings:
    """Build settings: defaults < config file < ``CXR_*`` variables < overrides.

    ``env`` defaults to ``os.environ``; tests pass their own mapping.  The config file is
    ``config_file`` (``--config``) or else ``CXR_CONFIG`` in ``env``: a TOML file whose
    top-level keys are setting names.  ``overrides`` are the command line's flags.
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
                raise SettingsError(f"config file {config_path}: {_unknown(key)}")
            values[key] = _coerce(key, raw)
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == f"{ENV_PREFIX}CONFIG":
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in names:
            raise SettingsError(_unknown(name, key))
        values[name] = _coerce(name, raw)
    for key, raw in (overrides or {}).items():
        if key not in names:
            raise SettingsError(_unknown(key))
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
    "SelectionRule",
]
