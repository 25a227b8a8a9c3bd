"""The model registry: which model files exist, which one scores studies now.

The database row (:class:`db.models.ModelVersion`) is the single record of a model.  The
worker watches ``stage``; promoting here is all it takes to switch models, without a
restart.  Every row carries the file's sha256, so a file swapped on disk is refused at
load time rather than silently scored with.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.atomic import file_sha256
from db.models import ModelStage, ModelVersion, as_utc, utcnow
from db.session import Database

log = logging.getLogger(__name__)


class RegistryError(ValueError):
    """The operator asked for a model that does not exist or cannot be registered."""


@dataclass(frozen=True)
class ModelInfo:
    """One registered model, as plain data: the one model record.

    The worker, the CLI and the trainer all read it (through :func:`production_model`,
    :func:`get_model` or :func:`list_models`); the model stamped into output objects
    (:class:`dicom_node.results.OutputModel`) is built from it in ``worker.outputs``.
    """

    id: int
    version: str
    stage: str
    architecture: str
    input_size: int
    threshold: float
    path: str
    sha256: str
    parent_version: str | None
    created_at: datetime | None
    promoted_at: datetime | None
    test_auc: float | None
    test_sensitivity: float | None
    test_specificity: float | None

    @classmethod
    def from_row(cls, row: ModelVersion) -> ModelInfo:
        metrics = (row.metadata_json or {}).get("metrics") or {}
        return cls(
            id=row.id,
            version=row.version,
            stage=row.stage,
            architecture=row.architecture,
            input_size=row.input_size,
            threshold=row.threshold,
            path=row.path,
            sha256=row.sha256,
            parent_version=row.parent_version,
            created_at=as_utc(row.created_at),
            promoted_at=as_utc(row.promoted_at),
            test_auc=_maybe_float(metrics.get("auc")),
            test_sensitivity=_maybe_float(metrics.get("sensitivity")),
            test_specificity=_maybe_float(metrics.get("specificity")),
        )

    def file(self, models_dir: Path) -> Path:
        """The checkpoint file: ``path`` as recorded, relative ones under ``models_dir``."""
        path = Path(self.path)
        return path if path.is_absolute() else Path(models_dir) / path

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["id"]  # a database detail, not part of the model's public description
        for key in ("created_at", "promoted_at"):
            if out[key] is not None:
                out[key] = out[key].isoformat()
        return out


def _maybe_float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _meta_from_checkpoint(path: Path) -> dict[str, Any]:
    """Read the metadata stored inside a checkpoint written by trainer.checkpoint."""
    from trainer.checkpoint import read_meta

    return meta_fields(read_meta(path).to_dict())


def meta_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's nested meta, with the fields the registry row needs on top."""
    out = dict(meta)
    prov = dict(out.get("provenance") or {})
    out.setdefault("parent_version", prov.get("parent_version"))
    out.setdefault("metrics", dict(prov.get("metrics") or {}))
    return out


def default_version(architecture: str, sha256: str, when: datetime | None = None) -> str:
    """A readable, unique version name: architecture, UTC time, and the file's digest."""
    when = when or utcnow()
    return f"{architecture}-{when:%Y%m%d-%H%M%S}-{sha256[:8]}"


@contextmanager
def _session(source: Database | Session) -> Iterator[Session]:
    """``source`` itself when it is an open session (the caller owns the transaction),
    else a short session of its own that commits on success."""
    if isinstance(source, Session):
        yield source
        return
    with source.session() as s:
        yield s


def register_model(
    db: Database | Session,
    path: Path,
    *,
    meta: Mapping[str, Any] | None = None,
    version: str | None = None,
    sha256: str | None = None,
    stage: ModelStage = ModelStage.CANDIDATE,
) -> ModelInfo:
    """Record a model file as a candidate (idempotent on the file's sha256).

    ``meta`` holds at least ``architecture``, ``input_size`` and ``threshold``; where it is
    not given, it is read from the checkpoint itself.  Registering the same file twice
    returns the existing row.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise RegistryError(f"model file {path} does not exist")
    digest = file_sha256(path)
    if sha256 is not None and sha256 != digest:
        raise RegistryError(f"model file {path} has sha256 {digest}, expected {sha256}")
    meta = dict(meta) if meta is not None else _meta_from_checkpoint(path)
    missing = [k for k in ("architecture", "input_size", "threshold") if meta.get(k) is None]
    if missing:
        raise RegistryError(f"model file {path} lacks metadata: {', '.join(missing)}")
    with _session(db) as s:
        existing = s.scalar(select(ModelVersion).where(ModelVersion.sha256 == digest))
        if existing is not None:
            log.info("model already registered version=%s sha256=%s", existing.version, digest)
            return ModelInfo.from_row(existing)
        name = version or str(meta.get("version") or "") or default_version(
            str(meta["architecture"]), digest
        )
        if s.scalar(select(ModelVersion).where(ModelVersion.version == name)) is not None:
            raise RegistryError(f"model version {name!r} already exists with another file")
        row = ModelVersion(
            version=name,
            architecture=str(meta["architecture"]),
            path=str(path),
            sha256=digest,
            threshold=float(meta["threshold"]),
            input_size=int(meta["input_size"]),
            stage=str(stage),
            parent_version=meta.get("parent_version"),
            metadata_json=_jsonable(dict(meta)),
        )
        s.add(row)
        s.flush()
        info = ModelInfo.from_row(row)
    log.info("model registered version=%s sha256=%s stage=%s", name, digest, stage)
    return info


def _jsonable(value: Any) -> Any:
    """Metadata as JSON values only (paths and tuples become strings and lists)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def get_model(db: Database, version: str) -> ModelInfo:
    with db.session() as s:
        row = s.scalar(select(ModelVersion).where(ModelVersion.version == version))
        if row is None:
            raise RegistryError(f"no model version {version!r}")
        return ModelInfo.from_row(row)


def promote(db: Database | Session, version: str) -> ModelInfo:
    """Make ``version`` the production model; the previous one is retired.

    Both changes happen in one transaction (the caller's, when given a session), so there
    is never zero or two production models for the worker to see.
    """
    with _session(db) as s:
        row = s.scalar(
            select(ModelVersion).where(ModelVersion.version == version).with_for_update()
        )
        if row is None:
            raise RegistryError(f"no model version {version!r}")
        current = s.scalars(
            select(ModelVersion)
            .where(ModelVersion.stage == ModelStage.PRODUCTION)
            .with_for_update()
        ).all()
        for other in current:
            if other.id != row.id:
                other.stage = ModelStage.RETIRED
        row.stage = ModelStage.PRODUCTION
        row.promoted_at = utcnow()
        s.flush()
        info = ModelInfo.from_row(row)
    log.info("model promoted version=%s", version)
    return info


def reject(db: Database | Session, version: str, reason: str) -> ModelInfo:
    """Mark a candidate as rejected (it lost to the champion); the reason is kept."""
    with _session(db) as s:
        row = s.scalar(select(ModelVersion).where(ModelVersion.version == version))
        if row is None:
            raise RegistryError(f"no model version {version!r}")
        if row.stage == ModelStage.PRODUCTION:
            raise RegistryError(f"model {version!r} is in production; promote another first")
        row.stage = ModelStage.REJECTED
        meta = dict(row.metadata_json or {})
        meta["rejected_reason"] = reason
        row.metadata_json = meta
        s.flush()
        info = ModelInfo.from_row(row)
    log.info("model rejected version=%s", version)
    return info


def production_model(source: Database | Session) -> ModelInfo | None:
    """The model that scores studies now, or None before the first promotion.

    The one production-model query: the newest promotion wins and a row promoted without a
    time sorts last on SQLite and PostgreSQL alike (``NULLS LAST``), then the newest id.
    ``source`` is a :class:`Database` (a short session of its own) or an open session.
    """
    if isinstance(source, Session):
        row = source.scalars(
            select(ModelVersion)
            .where(ModelVersion.stage == ModelStage.PRODUCTION)
            .order_by(ModelVersion.promoted_at.desc().nulls_last(), ModelVersion.id.desc())
            .limit(1)
        ).first()
        return None if row is None else ModelInfo.from_row(row)
    with source.session() as s:
        return production_model(s)


def list_models(db: Database) -> list[ModelInfo]:
    """Every registered model, oldest first."""
    with db.session() as s:
        rows = s.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
        return [ModelInfo.from_row(r) for r in rows]


def model_id(db: Database | Session, version: str) -> int:
    """The database id of a version (for Evaluation rows)."""
    with _session(db) as s:
        row_id = s.scalar(select(ModelVersion.id).where(ModelVersion.version == version))
    if row_id is None:
        raise RegistryError(f"no model version {version!r}")
    return int(row_id)


__all__ = [
    "ModelInfo",
    "RegistryError",
    "default_version",
    "file_sha256",
    "get_model",
    "list_models",
    "model_id",
    "production_model",
    "promote",
    "register_model",
    "reject",
]
