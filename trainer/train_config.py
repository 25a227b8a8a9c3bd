"""Everything that shapes a training run, in one frozen record (``TrainConfig``).

Built from the settings (``TrainConfig.from_settings``) with overrides for experiments, and
recorded in the model file's provenance (``public``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from db.settings import Settings
from trainer.transforms import Augmentation


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run.  Defaults are the measured best here."""

    architecture: str = "efficientnet_lite0"
    input_size: int = 320
    contrast: str = "clahe"
    cutoff: int | str = "block15"  # stages before this one are frozen (and cached)
    views: int = 3  # cached views per training image: 1 plain + (views-1) augmented
    head_epochs: int = 6
    epochs: int = 8
    batch_size: int = 16
    lr_head: float = 1e-3
    lr_body: float = 2e-4
    weight_decay: float = 1e-2
    patience: int = 3
    seed: int = 1234
    target_sensitivity: float = 0.98
    device: str = "auto"
    feature_batch: int = 32
    # "class": positives weighted by negatives/positives; "source_class": every
    # (source, class) cell weighs the same, so recognising the source pays less
    balance: str = "class"
    # "three": softmax over normal / other pneumonia / COVID-19; "two": one COVID-19 logit
    classes: str = "three"
    augmentation: Augmentation = field(default_factory=Augmentation)
    # the CUDA compute dtype the model is scored in, recorded in its file
    # (trainer.checkpoint.PRECISIONS); the CPU always computes in float32
    precision: str = "float32"

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TrainConfig:
        base = cls(architecture=settings.backbone, input_size=settings.input_size,
                   epochs=settings.epochs, batch_size=settings.batch_size,
                   seed=settings.seed, target_sensitivity=settings.target_sensitivity,
                   device=settings.device, contrast=settings.train_contrast,
                   cutoff=_cutoff(settings.train_cutoff), views=settings.train_views,
                   balance=settings.train_balance)
        return replace(base, **overrides)

    def public(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Augmentation) else v)
                for k, v in self.__dict__.items()}


def _cutoff(text: str) -> int | str:
    """A cutoff setting: a stage name such as ``block15``, or a stage index."""
    return int(text) if text.isdigit() else text


__all__ = ["TrainConfig"]
