"""Where the model looked: the maths of Grad-CAM and occlusion sensitivity, at the source
resolution.  The passes through the network are the scorer's (:mod:`trainer.scoring`), so a
map comes from the very forward, precision and memory format that scored the image.

- Grad-CAM (default) weights the last convolutional block's activations by the mean
  gradient of the COVID-19 logit (:func:`gradcam_squares`): one forward and one backward.
- Occlusion sensitivity, as in Deep-COVID: an N x N patch of the normalised mean is slid
  with stride S over the letterboxed image (:func:`occlusion_windows`, :func:`occlude`)
  and the drop in probability is recorded (:func:`sensitivity_square`).  Windows lying
  wholly in the letterbox padding are not evaluated.

Both end as float32 maps in [0, 1] mapped back through the image's :class:`Letterbox`
(:func:`unit`, :func:`to_source`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trainer.transforms import Letterbox

METHODS = ("gradcam", "occlusion")


def unit(cam: np.ndarray) -> np.ndarray:
    """A map clipped at 0 and scaled to a maximum of 1 (all zeros when nothing is positive)."""
    cam = np.clip(np.nan_to_num(cam.astype(np.float32)), 0.0, None)
    top = float(cam.max()) if cam.size else 0.0
    return cam / top if top > 0 else np.zeros_like(cam)


def to_source(square_map: np.ndarray, box: Letterbox) -> np.ndarray:
    """A map on the network's square back at the source image's resolution (float32)."""
    return np.asarray(np.clip(box.to_source(square_map), 0.0, 1.0), dtype=np.float32)


def gradcam_squares(act: torch.Tensor, grads: torch.Tensor, size: int) -> np.ndarray:
    """N x size x size Grad-CAM maps (unscaled) from the target layer's N x C x H x W
    activations and the gradients of the COVID-19 logit with respect to them."""
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act.float()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)
    squares: np.ndarray = cam[:, 0].detach().cpu().numpy()
    return squares


def _window_starts(length: int, size: int, stride: int, lo: int, hi: int) -> list[int]:
    """Window starts covering [lo, hi) of an axis of ``length`` (the last one flush)."""
    last = max(0, length - size)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return [s for s in starts if s < hi and s + size > lo]


def occlusion_windows(side: int, size: int, stride: int, box: Letterbox) -> list[tuple[int, int]]:
    """(top, left) of each ``size`` x ``size`` window over a ``side`` x ``side`` square that
    touches the image inside its letterbox."""
    ys = _window_starts(side, size, stride, box.top, box.top + box.height)
    xs = _window_starts(side, size, stride, box.left, box.left + box.width)
    return [(y, x) for y in ys for x in xs]


def occlude(x: torch.Tensor, windows: Sequence[tuple[int, int]], size: int) -> torch.Tensor:
    """One copy of the 1 x 3 x S x S input per window, that window set to the normalised
    mean (0)."""
    occluded = x.repeat(len(windows), 1, 1, 1)
    for i, (y, left) in enumerate(windows):
        occluded[i, :, y : y + size, left : left + size] = 0.0
    return occluded


def sensitivity_square(drops: np.ndarray, windows: Sequence[tuple[int, int]], size: int,
                       side: int) -> np.ndarray:
    """The mean probability drop of the windows covering each pixel of the square."""
    total = np.zeros((side, side), dtype=np.float64)
    count = np.zeros((side, side), dtype=np.float64)
    for (y, x), d in zip(windows, drops, strict=True):
        total[y : y + size, x : x + size] += float(d)
        count[y : y + size, x : x + size] += 1.0
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


__all__ = [
    "METHODS",
    "gradcam_squares",
    "occlude",
    "occlusion_windows",
    "sensitivity_square",
    "to_source",
    "unit",
]
