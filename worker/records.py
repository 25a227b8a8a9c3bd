"""The records one analysis passes between its steps: the claim, per-image and per-study
results and the outcome of one message.

Plain dataclasses, detached from any session, shared by ``worker.analysis`` (which makes
them) and ``worker.outputs`` (which turns them into DICOM objects).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from db.lifecycle import AnalyseStatus
from db.models import StudyState
from trainer.registry import ModelInfo


@dataclass(frozen=True)
class InstanceRef:
    """An instance of the claimed study, detached from the session."""

    id: int
    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class Claim:
    study_id: int
    study_uid: str
    generation: int
    attempt: int
    model: ModelInfo
    instances: tuple[InstanceRef, ...]


@dataclass(frozen=True)
class Outcome:
    """What happened to one analyse message.  ``status`` is one of: done, skipped, failed,
    waiting (no usable model), stale, duplicate, missing, not_ready, gave_up."""

    study_id: int
    status: AnalyseStatus
    reason: str | None = None
    analysis_id: int | None = None
    delivery_ids: tuple[int, ...] = ()


@dataclass
class ImageResult:
    """The outcome for one instance before it is written as a Prediction."""

    instance: InstanceRef
    scored: bool
    skip_reason: str | None = None
    bad_input: bool = False
    probability: float | None = None
    pneumonia_probability: float | None = None  # three-class models only
    heatmap_path: Path | None = None
    image: np.ndarray | None = None
    heatmap: np.ndarray | None = None
    header: Any = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class StudyResult:
    """Everything computed for a study generation, ready to be stored."""

    state: StudyState
    reason: str | None
    images: list[ImageResult]
    probability: float | None = None
    positive: bool | None = None
    pneumonia_probability: float | None = None  # three-class models only
    pneumonia_positive: bool | None = None
    pneumonia_threshold: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
