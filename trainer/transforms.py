"""From [0, 1] grayscale images to the network's input tensor, identically in training and
inference.

``prepare_batch`` letterboxes each image to the model's input size and applies its contrast
method (both in :mod:`dicom_node.pixels`), then :func:`normalise` repeats the gray channel
to RGB and applies the backbone's mean/std.  Training adds :func:`augment` between the two,
on the [0, 1] squares, as tensor operations that run on the model's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dicom_node.pixels import Letterbox, prepare_image
from trainer.checkpoint import ModelMeta, Preprocessing


def prepare_squares(
    images01: Sequence[np.ndarray], meta: ModelMeta
) -> tuple[np.ndarray, list[Letterbox]]:
    """N x S x S float32 squares (letterboxed, contrast applied) and their letterboxes."""
    p = meta.preprocessing
    squares = np.empty((len(images01), meta.input_size, meta.input_size), dtype=np.float32)
    boxes: list[Letterbox] = []
    for i, img in enumerate(images01):
        squares[i], box = prepare_image(img, meta.input_size, p.contrast, p.clahe_clip,
                                        p.clahe_tiles)
        boxes.append(box)
    return squares, boxes


def normalise(squares: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """N x 1 x S x S (or N x S x S) in [0, 1] to N x 3 x S x S normalised for the backbone."""
    if squares.dim() == 3:
        squares = squares.unsqueeze(1)
    mean = torch.tensor(preprocessing.mean, dtype=squares.dtype, device=squares.device)
    std = torch.tensor(preprocessing.std, dtype=squares.dtype, device=squares.device)
    return (squares.expand(-1, 3, -1, -1) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def prepare_batch(
    images01: Sequence[np.ndarray], meta: ModelMeta, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, list[Letterbox]]:
    """The network's input for ``images01`` on ``device``, with each image's letterbox."""
    squares, boxes = prepare_squares(images01, meta)
    tensor = torch.from_numpy(squares).to(device, non_blocking=True)
    return normalise(tensor, meta.preprocessing), boxes


def to_tensor_batch(
    images01: Sequence[np.ndarray], meta: ModelMeta, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Letterbox + contrast + normalisation: the contract shared by trainer and worker."""
    return prepare_batch(images01, meta, device)[0]


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random training augmentations (the seed papers' mild geometric and
    intensity jitter; no flips, since a mirrored chest puts the heart on the wrong side)."""

    rotate_degrees: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06
    brightness: float = 0.1
    contrast: float = 0.15
    gamma: tuple[float, float] = (0.8, 1.25)


def augment(
    squares: torch.Tensor, generator: torch.Generator | None = None,
    params: Augmentation = Augmentation(),
) -> torch.Tensor:
    """Random affine and intensity jitter on N x 1 x S x S squares in [0, 1]."""
    if squares.dim() == 3:
        squares = squares.unsqueeze(1)
    n, dev, dt = squares.shape[0], squares.device, squares.dtype

    def uniform(lo: float, hi: float) -> torch.Tensor:
        r = torch.rand(n, generator=generator, dtype=torch.float32)
        return (lo + (hi - lo) * r).to(device=dev, dtype=dt)

    angle = uniform(-params.rotate_degrees, params.rotate_degrees) * (np.pi / 180.0)
    scale = uniform(*params.scale)
    tx = uniform(-params.translate, params.translate) * 2
    ty = uniform(-params.translate, params.translate) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta, list(squares.shape), align_corners=False)
    out = F.grid_sample(squares, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = uniform(*params.gamma).view(n, 1, 1, 1)
    out = out.clamp(0, 1) ** gamma
    c = uniform(1 - params.contrast, 1 + params.contrast).view(n, 1, 1, 1)
    b = uniform(-params.brightness, params.brightness).view(n, 1, 1, 1)
    mean = out.mean(dim=(2, 3), keepdim=True)
    return ((out - mean) * c + mean + b).clamp(0, 1)


__all__ = [
    "Augmentation",
    "augment",
    "normalise",
    "prepare_batch",
    "prepare_squares",
    "to_tensor_batch",
]
