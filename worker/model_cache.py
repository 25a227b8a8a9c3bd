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
from typing import Any

from sqlalchemy.orm import Session

from db.errors import CxrError
from db.settings import Settings
from trainer.registry import ModelInfo, production_model

log = logging.getLogger(__name__)

NO_PRODUCTION_MODEL = "no production model registered"


class ModelUnavailableError(CxrError):
    """The registered production model cannot be used (missing file, checksum mismatch).

    Not the study's fault: the study waits, as it does when no model is registered."""


@dataclass
class LoadedProductionModel:
    """A loaded model version with its scorer, held by one worker process."""

    info: ModelInfo
    loaded: Any  # trainer.checkpoint.LoadedModel
    scorer: Any  # trainer.scoring.Scorer
    device: str


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
        return production_model(session)

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
        from trainer.checkpoint import load_checkpoint, resolve_device
        from trainer.scoring import Scorer

        path = info.file(self.settings.models_dir)
        if not path.is_file():
            raise ModelUnavailableError(
                f"model file for version {info.version} not found at {path}"
            )
        device = str(resolve_device(self.settings.device))
        try:
            loaded = load_checkpoint(path, expected_sha256=info.sha256, device=device)
        except (ValueError, OSError, RuntimeError) as exc:
            raise ModelUnavailableError(
                f"model version {info.version} cannot be loaded: {exc}"
            ) from exc
        return LoadedProductionModel(info=info, loaded=loaded, scorer=Scorer(loaded, device),
                                     device=device)
