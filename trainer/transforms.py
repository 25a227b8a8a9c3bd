"""From [0, 1] grayscale images to the network's input tensor, identically in training and
inference.

:func:`prepare_image` letterboxes each decoded image (:mod:`dicom_node.pixels` only decodes)
to the model's square input and applies the contrast method its preprocessing record names;
:func:`normalise` then repeats the gray channel to RGB and applies the backbone's mean/std.
The :class:`Letterbox` each image gets brings maps on the square back to the source
resolution.  Training adds :func:`augment` between the two, on the [0, 1] squares, as tensor
operations that run on the model's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from db.errors import UnsupportedImageError
from dicom_node.pixels import FloatImage
from trainer.checkpoint import CONTRAST_METHODS, ModelMeta, Preprocessing


@dataclass(frozen=True)
class Letterbox:
    """How a source image sits inside the square network input.

    The image was scaled by ``scale`` to ``height`` x ``width`` and placed at
    (``top``, ``left``) in a ``size`` x ``size`` square padded with zeros.
    """

    size: int
    scale: float
    top: int
    left: int
    height: int
    width: int
    source_height: int
    source_width: int

    def to_source(self, map_sq: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
        """A map on the square back to the source resolution (``shape`` = (h, w))."""
        h, w = shape if shape is not None else (self.source_height, self.source_width)
        sq: np.ndarray = np.asarray(map_sq, dtype=np.float32)
        if sq.shape != (self.size, self.size):
            sq = np.asarray(cv2.resize(sq, (self.size, self.size), interpolation=cv2.INTER_LINEAR))
        inner = sq[self.top : self.top + self.height, self.left : self.left + self.width]
        out = cv2.resize(np.ascontiguousarray(inner), (int(w), int(h)),
                         interpolation=cv2.INTER_LINEAR)
        return np.asarray(out, dtype=np.float32)


def _fit(img: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    h, w = img.shape
    if h < 1 or w < 1:
        raise UnsupportedImageError(f"empty image of shape {img.shape}")
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    src: np.ndarray = np.ascontiguousarray(img, dtype=np.float32)
    factor = int(1.0 / scale) if scale < 0.5 else 1
    if factor >= 2:
        # Integer-factor area reduction first (OpenCV's fast path), then the fractional rest:
        # half the time of one INTER_AREA pass on a 1024 x 1024 radiograph.
        src = cv2.resize(src, (max(nw, w // factor), max(nh, h // factor)),
                         interpolation=cv2.INTER_AREA)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(src, (nw, nh), interpolation=interp)
    top, left = (size - nh) // 2, (size - nw) // 2
    return resized, Letterbox(size, scale, top, left, nh, nw, h, w)


def _pad(resized: np.ndarray, box: Letterbox) -> np.ndarray:
    square = np.zeros((box.size, box.size), dtype=np.float32)
    square[box.top : box.top + box.height, box.left : box.left + box.width] = resized
    return square


def letterbox(img: FloatImage, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio (INTER_AREA when shrinking) and pad to a square."""
    resized, box = _fit(img, size)
    return _pad(np.clip(resized, 0.0, 1.0), box), box


def apply_contrast(
    img: FloatImage, method: str, clahe_clip: float = 2.0, clahe_tiles: int = 8
) -> FloatImage:
    """Optional contrast normalisation on an 8-bit rendering: CLAHE or global equalisation."""
    if method == "none":
        return img
    if method not in CONTRAST_METHODS:
        raise ValueError(f"contrast method {method!r} must be one of {CONTRAST_METHODS}")
    u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    if method == "clahe":
        clahe = cv2.createCLAHE(clipLimit=clahe_clip, tileGridSize=(clahe_tiles, clahe_tiles))
        out = clahe.apply(u8)
    else:
        out = cv2.equalizeHist(u8)
    return out.astype(np.float32) / 255.0


def prepare_image(
    img: FloatImage, size: int, contrast: str = "none", clahe_clip: float = 2.0,
    clahe_tiles: int = 8,
) -> tuple[np.ndarray, Letterbox]:
    """Letterbox to ``size`` and apply the contrast method to the image (not the padding)."""
    resized, box = _fit(img, size)
    resized = apply_contrast(np.clip(resized, 0.0, 1.0), contrast, clahe_clip, clahe_tiles)
    return _pad(resized, box), box



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
    "CONTRAST_METHODS",
    "Letterbox",
    "apply_contrast",
    "augment",
    "letterbox",
    "normalise",
    "prepare_image",
    "prepare_batch",
    "prepare_squares",
    "to_tensor_batch",
]
