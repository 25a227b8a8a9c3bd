"""The production model, loaded once per worker process and swapped when the registry
names a newer one.

The database is the registry: the newest ``ModelVersion`` with ``stage=production`` is the
model to use.  Each task asks :meth:`ModelCache.production` (one indexed query) and then
:meth:`ModelCache.get`, which loads from disk only when the version differs from the one
held; so a promotion takes effect on the next study with no restart.  Loading checks the
file's sha256 and uses ``weights_only=True`` (``trainer.checkpoint.load_checkpoint``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.errors import CxrError
from db.models import ModelStage, ModelVersion
from db.settings import Settings

log = logging.getLogger(__name__)

NO_PRODUCTION_MODEL = "no production model registered"


class ModelUnavailableError(CxrError):
    """The registered production model cannot be used (missing file, checksum mismatch).

    Not the study's fault: the study waits, as it does when no model is registered."""


@dataclass(frozen=True)
class ModelInfo:
    """What a task needs to know about the production model, detached from any session."""

    id: int
    version: str
    architecture: str
    path: Path
    sha256: str
    threshold: float
    input_size: int


@dataclass
class LoadedProductionModel:
    """A loaded model version with its scorer, held by one worker process."""

    info: ModelInfo
    loaded: Any  # trainer.checkpoint.LoadedModel
    scorer: Any  # trainer.scoring.Scorer
    device: str


def production_model(session: Session, settings: Settings) -> ModelInfo | None:
    """The production model version recorded in the database, or None."""
    row = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.stage == ModelStage.PRODUCTION)
        .order_by(ModelVersion.promoted_at.desc().nulls_last(), ModelVersion.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    path = Path(row.path)
    if not path.is_absolute():
        path = settings.models_dir / path
    return ModelInfo(
        id=row.id,
        version=row.version,
        architecture=row.architecture,
        path=path,
        sha256=row.sha256,
        threshold=float(row.threshold),
        input_size=int(row.input_size),
    )


def resolve_device(setting: str) -> str:
    """``auto`` means the first CUDA device where one is available, else the CPU."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


class ModelCache:
    """Holds at most one loaded model version per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._held: LoadedProductionModel | None = None
        self._lock = threading.Lock()

    @property
    def held_version(self) -> str | None:
        return self._held.info.version if self._held else None

    def production(self, session: Session) -> ModelInfo | None:
        return production_model(session, self.settings)

    def get(self, info: ModelInfo) -> LoadedProductionModel:
        """The loaded model for ``info``, loading (and dropping the old one) if needed."""
        with self._lock:
            if self._held is not None and self._held.info.id == info.id:
                return self._held
            previous = self.held_version
            held = self._load(info)
            self._held = held
            log.info(
                "model loaded version=%s architecture=%s device=%s previous=%s",
                info.version, info.architecture, held.device, previous,
            )
            return held

    def _load(self, info: ModelInfo) -> LoadedProductionModel:
        from trainer.checkpoint import load_checkpoint
        from trainer.scoring import Scorer

        if not info.path.is_file():
            raise ModelUnavailableError(
                f"model file for version {info.version} not found at {info.path}"
            )
        device = resolve_device(self.settings.device)
        try:
            loaded = load_checkpoint(info.path, expected_sha256=info.sha256, device=device)
        except (ValueError, OSError, RuntimeError) as exc:
            raise ModelUnavailableError(
                f"model version {info.version} cannot be loaded: {exc}"
            ) from exc
        return LoadedProductionModel(info=info, loaded=loaded, scorer=Scorer(loaded, device),
                                     device=device)
