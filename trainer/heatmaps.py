"""Where the model looked: Grad-CAM and occlusion sensitivity, at the source resolution.

- Grad-CAM (default) weights the last convolutional block's activations by the mean
  gradient of the COVID-19 logit: one forward and one backward pass.
- Occlusion sensitivity, as in Deep-COVID: an N x N patch of the normalised mean is slid
  with stride S over the letterboxed image and the drop in probability is recorded.  The
  occluded copies go through the network in batches (``occlusion_batch``), and windows
  lying wholly in the letterbox padding are not evaluated.

Both return float32 maps in [0, 1] mapped back through the image's :class:`Letterbox`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from db.settings import Settings
from trainer.architectures import gradcam_layer
from trainer.checkpoint import LoadedModel, findings, resolve_device
from trainer.scoring import autocast_dtype, gpu_memory_is_transient
from trainer.transforms import Letterbox, prepare_batch

METHODS = ("gradcam", "occlusion")


def _device(loaded: LoadedModel, device: str | torch.device | None) -> torch.device:
    dev = resolve_device(device) if device is not None else loaded.device
    loaded.model.to(dev)
    loaded.device = dev
    return dev


def _unit(cam: np.ndarray) -> np.ndarray:
    cam = np.clip(np.nan_to_num(cam.astype(np.float32)), 0.0, None)
    top = float(cam.max()) if cam.size else 0.0
    return cam / top if top > 0 else np.zeros_like(cam)


def _to_source(square_map: np.ndarray, box: Letterbox) -> np.ndarray:
    return np.asarray(np.clip(box.to_source(square_map), 0.0, 1.0), dtype=np.float32)


def gradcam_batch(
    loaded: LoadedModel, images01: list[np.ndarray], device: str | torch.device | None = None
) -> list[np.ndarray]:
    """Grad-CAM for each image (float32 in [0, 1], source resolution)."""
    return gradcam_and_probabilities(loaded, images01, device)[0]


def gradcam_and_probabilities(
    loaded: LoadedModel, images01: list[np.ndarray], device: str | torch.device | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Grad-CAM maps and the model's COVID-19 probabilities from the same forward pass."""
    maps, covid, _ = gradcam_and_findings(loaded, images01, device)
    return maps, covid


def gradcam_and_findings(
    loaded: LoadedModel, images01: list[np.ndarray], device: str | torch.device | None = None
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
    """Grad-CAM maps of the COVID-19 logit, P(COVID-19) and P(pneumonia pattern) (None for
    a two-class model), from the same forward pass.

    The worker scores and explains a study with one forward and one backward pass instead
    of a scoring pass followed by a Grad-CAM pass.  The forward runs in float32 without
    autocast, so on CUDA the probability may differ from the autocast scorer's in the
    third decimal; on the CPU the two agree to float precision (tested)."""
    dev = _device(loaded, device)
    model, meta = loaded.model, loaded.meta
    x, boxes = prepare_batch(images01, meta, dev)
    x.requires_grad_(True)  # so the maps exist even when every weight is frozen
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        captured["act"] = output
        return output.clone()  # later in-place ops (ReLU) must not alter what we keep

    handle = gradcam_layer(model, meta.architecture).register_forward_hook(hook)
    try:
        with gpu_memory_is_transient(), torch.inference_mode(False), torch.enable_grad():
            model.eval()
            out = model(x).reshape(x.shape[0], -1)
            target = out[:, meta.classes.index("covid")] if meta.outputs > 1 else out[:, 0]
            act = captured["act"]
            (grads,) = torch.autograd.grad(target.sum(), act)
            weights = grads.float().mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * act.float()).sum(dim=1, keepdim=True))
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
            maps = cam[:, 0].detach().cpu().numpy()
            covid, pneu = findings(out.detach().float().cpu(), meta)
    finally:
        handle.remove()
    return ([_to_source(_unit(m), box) for m, box in zip(maps, boxes, strict=True)],
            covid.numpy().astype(np.float64),
            None if pneu is None else pneu.numpy().astype(np.float64))


def gradcam(
    loaded: LoadedModel, image01: np.ndarray, device: str | torch.device | None = None
) -> np.ndarray:
    """Grad-CAM on the last convolutional block, at ``image01``'s resolution."""
    return gradcam_batch(loaded, [image01], device)[0]


def _window_starts(length: int, size: int, stride: int, lo: int, hi: int) -> list[int]:
    """Window starts covering [lo, hi) of an axis of ``length`` (the last one flush)."""
    last = max(0, length - size)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return [s for s in starts if s < hi and s + size > lo]


def occlusion(
    loaded: LoadedModel, image01: np.ndarray, size: int = 32, stride: int = 16,
    batch: int = 64, device: str | torch.device | None = None,
) -> np.ndarray:
    """Occlusion sensitivity: the mean probability drop where a patch hides each pixel."""
    if size < 1 or stride < 1 or batch < 1:
        raise ValueError("occlusion size, stride and batch must be positive")
    dev = _device(loaded, device)
    model, meta = loaded.model.eval(), loaded.meta
    x, (box,) = prepare_batch([image01], meta, dev)
    s = x.shape[-1]
    size = min(size, s)
    ys = _window_starts(s, size, stride, box.top, box.top + box.height)
    xs = _window_starts(s, size, stride, box.left, box.left + box.width)
    windows = [(y, xx) for y in ys for xx in xs]
    amp = autocast_dtype(dev)
    memory_format = (
        torch.channels_last if dev.type == "cpu" else torch.contiguous_format
    )

    def probs(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous(memory_format=memory_format)
        if amp is not None:
            with torch.autocast(dev.type, dtype=amp):
                return findings(model(t).float(), loaded.meta)[0]
        return findings(model(t).float(), loaded.meta)[0]

    drops = torch.zeros(len(windows), dtype=torch.float32)
    with gpu_memory_is_transient(), torch.inference_mode():
        base = probs(x)[0]
        for start in range(0, len(windows), batch):
            chunk = windows[start : start + batch]
            occluded = x.repeat(len(chunk), 1, 1, 1)
            for i, (y, xx) in enumerate(chunk):
                occluded[i, :, y : y + size, xx : xx + size] = 0.0  # the normalised mean
            drops[start : start + len(chunk)] = (base - probs(occluded)).float().cpu()
    total = np.zeros((s, s), dtype=np.float64)
    count = np.zeros((s, s), dtype=np.float64)
    for (y, xx), d in zip(windows, drops.numpy(), strict=True):
        total[y : y + size, xx : xx + size] += float(d)
        count[y : y + size, xx : xx + size] += 1.0
    sensitivity = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return _to_source(_unit(sensitivity), box)


def compute(
    loaded: LoadedModel, image01: np.ndarray, settings: Settings,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """The heatmap chosen by ``settings.heatmap_method``."""
    if settings.heatmap_method == "occlusion":
        return occlusion(loaded, image01, settings.occlusion_size, settings.occlusion_stride,
                         settings.occlusion_batch, device)
    if settings.heatmap_method == "gradcam":
        return gradcam(loaded, image01, device)
    raise ValueError(f"heatmap method {settings.heatmap_method!r} must be one of {METHODS}")


__all__ = [
    "METHODS",
    "compute",
    "gradcam",
    "gradcam_batch",
    "occlusion",
]
