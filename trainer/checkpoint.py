"""Model checkpoints that carry everything needed to score exactly as in training.

A checkpoint is one ``torch.save`` file holding plain values only (strings, numbers, lists,
dicts and tensors), so it loads with ``torch.load(weights_only=True)`` and no pickled code
runs.  It records the architecture, the preprocessing (input size, contrast method,
normalisation), the operating thresholds, the precision the model is scored in and the
training provenance.  Files are written
atomically and identified by their sha256, which the registry stores and the worker checks.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from db.atomic import file_sha256, write_atomically
from trainer.architectures import build_model, normalisation

FORMAT = "cxr-triage-checkpoint/1"

# A model's classes, in the order of its outputs.  Two-class files (every file written
# before the three-class head, which records no classes) have one logit: P(COVID-19) is
# its sigmoid.  Three-class files have a softmax head; the pneumonia-pattern finding is
# P(covid) + P(other_pneumonia).
TWO_CLASSES: tuple[str, ...] = ("not_covid", "covid")
THREE_CLASSES: tuple[str, ...] = ("normal", "other_pneumonia", "covid")
KNOWN_CLASSES = (TWO_CLASSES, THREE_CLASSES)

# The contrast normalisations a model's preprocessing may name (trainer.transforms).
CONTRAST_METHODS = ("none", "clahe", "equalize")
# The compute dtype a model is scored in on CUDA (trainer.scoring.Scorer); the CPU always
# computes in float32.  Files written before the policy was recorded have none and score
# in float32: what the worker's Grad-CAM pass already used for their production
# probabilities, and the safest at a threshold near 0.02.
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, unreadable or not ours)."""


class ChecksumMismatchError(CheckpointError):
    """The file's sha256 differs from the one registered: corrupt or replaced."""


@dataclass(frozen=True)
class Preprocessing:
    """How a [0, 1] grayscale image becomes the network's input, beyond the letterbox."""

    contrast: str = "none"  # none, clahe or equalize (trainer.transforms.apply_contrast)
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.contrast not in CONTRAST_METHODS:
            raise ValueError(f"contrast {self.contrast!r} must be one of {CONTRAST_METHODS}")

    @classmethod
    def for_backbone(cls, name: str, contrast: str = "none") -> Preprocessing:
        mean, std = normalisation(name)
        return cls(contrast=contrast, mean=mean, std=std)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            contrast=str(data.get("contrast", "none")),
            clahe_clip=float(data.get("clahe_clip", 2.0)),
            clahe_tiles=int(data.get("clahe_tiles", 8)),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class Provenance:
    """Where a model came from: the data it saw, its parent, its validation metrics."""

    data_digest: str = ""
    parent_version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # plain JSON values only


@dataclass(frozen=True)
class ModelMeta:
    """Everything beside the weights that scoring and auditing need."""

    architecture: str
    input_size: int
    preprocessing: Preprocessing
    threshold: float = 0.5
    provenance: Provenance = field(default_factory=Provenance)
    version: str = ""
    classes: tuple[str, ...] = TWO_CLASSES
    # the pneumonia-pattern finding's threshold (three-class models only)
    pneumonia_threshold: float | None = None
    # the CUDA compute dtype of every score, validation to production (see PRECISIONS)
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.classes not in KNOWN_CLASSES:
            raise ValueError(f"classes {self.classes!r} must be one of {KNOWN_CLASSES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} must be one of {PRECISIONS}")

    @property
    def outputs(self) -> int:
        """Logits of the head: 1 for the two-class sigmoid, else one per class."""
        return 1 if self.classes == TWO_CLASSES else len(self.classes)

    @property
    def has_pneumonia(self) -> bool:
        return self.classes == THREE_CLASSES

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocessing"]["mean"] = list(self.preprocessing.mean)
        data["preprocessing"]["std"] = list(self.preprocessing.std)
        data["classes"] = list(self.classes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMeta:
        prov = dict(data.get("provenance") or {})
        return cls(
            architecture=str(data["architecture"]),
            input_size=int(data["input_size"]),
            preprocessing=Preprocessing.from_dict(dict(data["preprocessing"])),
            threshold=float(data.get("threshold", 0.5)),
            provenance=Provenance(
                data_digest=str(prov.get("data_digest", "")),
                parent_version=prov.get("parent_version"),
                metrics={str(k): float(v) for k, v in dict(prov.get("metrics") or {}).items()},
                extra=dict(prov.get("extra") or {}),
            ),
            version=str(data.get("version", "")),
            classes=tuple(str(c) for c in data.get("classes") or TWO_CLASSES),
            pneumonia_threshold=(None if data.get("pneumonia_threshold") is None
                                 else float(data["pneumonia_threshold"])),
            precision=str(data.get("precision") or "float32"),
        )


@dataclass
class LoadedModel:
    """A model in eval mode on its device, with its meta and the file's sha256."""

    model: nn.Module
    meta: ModelMeta
    sha256: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def save_checkpoint(path: Path, model: nn.Module, meta: ModelMeta) -> str:
    """Write ``model``'s weights and ``meta`` atomically to ``path``; return the sha256.

    The bytes go to a temporary file in the same directory, are fsynced, then renamed over
    ``path`` and the directory is fsynced, so a crash leaves either the old file or the new.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "meta": meta.to_dict(), "state_dict": state}, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    write_atomically(path, lambda fh: fh.write(payload))
    return digest


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available; otherwise the named device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def findings(logits: torch.Tensor, meta: ModelMeta) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(P(COVID-19), P(pneumonia pattern) or None) per row of ``logits`` (N x outputs)."""
    logits = logits.float().reshape(logits.shape[0], -1)
    if meta.outputs == 1:
        return torch.sigmoid(logits[:, 0]), None
    p = torch.softmax(logits, dim=1)
    covid = p[:, meta.classes.index("covid")]
    return covid, covid + p[:, meta.classes.index("other_pneumonia")]


def read_meta(path: Path) -> ModelMeta:
    """The meta of a checkpoint, without building the model."""
    data = _load_payload(Path(path).read_bytes(), path)
    return ModelMeta.from_dict(data["meta"])


def _load_payload(payload: bytes, path: Path) -> dict[str, Any]:
    try:
        data = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged archive
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    return data


def load_checkpoint(
    path: Path, expected_sha256: str | None = None, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Verify, load (``weights_only=True``) and rebuild a checkpoint without downloading."""
    path = Path(path)
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    digest = hashlib.sha256(payload).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ChecksumMismatchError(
            f"checkpoint {path} has sha256 {digest}, expected {expected_sha256}"
        )
    data = _load_payload(payload, path)
    meta = ModelMeta.from_dict(data["meta"])
    model = build_model(meta.architecture, pretrained=False, outputs=meta.outputs)
    try:
        model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit {meta.architecture}: {exc}") from exc
    dev = resolve_device(device)
    model.to(dev).eval()
    return LoadedModel(model=model, meta=meta, sha256=digest, device=dev)


__all__ = [
    "CONTRAST_METHODS",
    "CheckpointError",
    "ChecksumMismatchError",
    "LoadedModel",
    "ModelMeta",
    "PRECISIONS",
    "Preprocessing",
    "Provenance",
    "THREE_CLASSES",
    "TWO_CLASSES",
    "file_sha256",
    "findings",
    "load_checkpoint",
    "read_meta",
    "resolve_device",
    "save_checkpoint",
]
