"""The one scorer: every probability the project acts on, and the maps that explain it.

Threshold choice (:func:`trainer.train.train_model`), evaluation (:mod:`trainer.evaluate`)
and production (:mod:`worker.analysis`, with Grad-CAM or occlusion) all score through
:class:`Scorer`, so an image scored on validation and the same image scored by the worker
get the same number, bitwise on the same machine and device (tests/test_scoring_parity.py).
That matters: an operating threshold (about 0.02) is the k-th positive validation score
itself, so any difference between two paths flips calls.  What makes the paths one:

- the input: ``trainer.transforms.prepare_batch`` (letterbox, contrast, normalisation);
- the forward: one image at a time.  oneDNN and cuDNN choose kernels by batch size, so a
  score from a batch depends, in its last bits, on the images beside it; a batch of one
  does not.  Grad-CAM's forward runs the same kernels with autograd on;
- the memory format: channels_last on the CPU (faster in oneDNN), contiguous on CUDA;
- the precision: the model file's policy (``ModelMeta.precision``) is the autocast dtype
  on CUDA; the CPU always computes in float32.  On CUDA, TF32 convolutions are off (so
  float32 means float32) and cuDNN runs deterministic algorithms.

Scores run under ``torch.inference_mode``; only Grad-CAM differentiates, from the target
layer on (the scorer's weights are frozen).  A CUDA out-of-memory error is the
infrastructure's trouble, not the study's, so it surfaces as :class:`TransientError` and
the worker retries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from db.errors import TransientError
from db.settings import Settings
from dicom_node.pixels import load_image_file
from trainer.architectures import gradcam_layer
from trainer.checkpoint import PRECISIONS, LoadedModel, findings, resolve_device
from trainer.heatmaps import (
    METHODS,
    gradcam_squares,
    occlude,
    occlusion_windows,
    sensitivity_square,
    to_source,
    unit,
)
from trainer.transforms import prepare_batch, to_tensor_batch

log = logging.getLogger(__name__)

#: Files decoded ahead of scoring, so that a long list never sits in memory at once.
DECODE_CHUNK = 16

Findings = tuple[np.ndarray, np.ndarray | None]


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of the policy ``precision`` on ``device``; None: plain float32.

    Reduced precision is a CUDA policy only.  A GPU without bfloat16 computes a bfloat16
    model in float32 (float16's narrower range is no silent substitute)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} must be one of {PRECISIONS}")
    if device.type != "cuda" or precision == "float32":
        return None
    if precision == "float16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else None


@contextmanager
def gpu_memory_is_transient() -> Iterator[None]:
    """Turn CUDA out-of-memory into a retryable :class:`TransientError`."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise TransientError(f"GPU out of memory: {exc}") from exc


class Scorer:
    """Scores [0, 1] images with a loaded model by the policy its file records."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "auto") -> None:
        self.loaded = loaded
        self.meta = loaded.meta
        self.device = resolve_device(device)
        self.memory_format = (torch.channels_last if self.device.type == "cpu"
                              else torch.contiguous_format)
        self.amp_dtype = autocast_dtype(self.device, self.meta.precision)
        self.model = loaded.model.to(self.device).to(memory_format=self.memory_format).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)  # Grad-CAM differentiates activations, never weights
        loaded.device = self.device
        self._target = self.meta.classes.index("covid") if self.meta.outputs > 1 else 0

    # ------------------------------------------------------------------------ the forward
    @contextmanager
    def _policy(self, autocast: bool = True) -> Iterator[None]:
        """The precision policy around a pass (autocast off for a backward pass)."""
        if self.device.type != "cuda":
            yield
            return
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                        allow_tf32=False):
            if autocast and self.amp_dtype is not None:
                with torch.autocast("cuda", dtype=self.amp_dtype):
                    yield
            else:
                yield

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 N x outputs logits (on the device) of a prepared batch."""
        x = x.to(self.device).contiguous(memory_format=self.memory_format)
        with self._policy():
            out: torch.Tensor = self.model(x)
        return out.float().reshape(out.shape[0], -1)

    def _covid(self, x: torch.Tensor) -> torch.Tensor:
        return findings(self._logits(x).cpu(), self.meta)[0]

    def prepare(self, images01: Sequence[np.ndarray]) -> torch.Tensor:
        """Letterbox, contrast and normalise exactly as in training (N x 3 x S x S)."""
        return to_tensor_batch(images01, self.meta)

    # ------------------------------------------------------------------------- the scores
    def predict_findings(self, batch: Sequence[np.ndarray] | torch.Tensor) -> Findings:
        """(P(COVID-19), P(pneumonia pattern)) per image (float64), each image scored on
        its own; the second is None for a two-class model.  ``batch``: images in [0, 1],
        or a prepared N x 3 x S x S tensor."""
        n = len(batch)
        covid = np.zeros(n, dtype=np.float64)
        pneu = np.zeros(n, dtype=np.float64) if self.meta.has_pneumonia else None
        with gpu_memory_is_transient(), torch.inference_mode():
            for i in range(n):
                x = (batch[i : i + 1] if isinstance(batch, torch.Tensor)
                     else self.prepare([batch[i]]))
                c, p = findings(self._logits(x).cpu(), self.meta)
                covid[i] = float(c[0])
                if pneu is not None and p is not None:
                    pneu[i] = float(p[0])
        return covid, pneu

    def predict(self, batch: Sequence[np.ndarray] | torch.Tensor) -> np.ndarray:
        """P(COVID-19) (float64, one per image) of images in [0, 1] or a prepared batch."""
        return self.predict_findings(batch)[0]

    def predict_findings_files(
        self, paths: Sequence[Path], pool: ThreadPoolExecutor | None = None,
        progress: Callable[[int], Any] | None = None,
    ) -> Findings:
        """Decode (in ``pool`` when given) and score DICOM, PNG or JPEG files, a chunk at a
        time; ``progress(n)`` hears of each chunk scored."""
        covid: list[np.ndarray] = []
        pneu: list[np.ndarray] = []
        for start in range(0, len(paths), DECODE_CHUNK):
            chunk = list(paths[start : start + DECODE_CHUNK])
            images = (list(pool.map(load_image_file, chunk)) if pool is not None
                      else [load_image_file(p) for p in chunk])
            c, p = self.predict_findings(images)
            covid.append(c)
            if p is not None:
                pneu.append(p)
            if progress is not None:
                progress(len(chunk))
        empty = np.zeros(0, dtype=np.float64)
        all_covid = np.concatenate(covid) if covid else empty
        if not self.meta.has_pneumonia:
            return all_covid, None
        return all_covid, (np.concatenate(pneu) if pneu else empty.copy())

    def predict_files(self, paths: Sequence[Path],
                      pool: ThreadPoolExecutor | None = None) -> np.ndarray:
        """P(COVID-19) of DICOM, PNG or JPEG files."""
        return self.predict_findings_files(paths, pool)[0]

    # --------------------------------------------------------------------------- the maps
    def findings_and_gradcam(self, images01: Sequence[np.ndarray],
                             ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
        """Grad-CAM of the COVID-19 logit per image (float32 in [0, 1], source resolution),
        with P(COVID-19) and P(pneumonia pattern) (None for a two-class model) taken from
        the same forward pass: they equal :meth:`predict_findings`'s, so the worker scores
        and explains a study with one forward and one backward pass per image."""
        n = len(images01)
        maps: list[np.ndarray] = []
        covid = np.zeros(n, dtype=np.float64)
        pneu = np.zeros(n, dtype=np.float64) if self.meta.has_pneumonia else None
        captured: dict[str, torch.Tensor] = {}

        def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            act = output.detach().requires_grad_(True)  # the graph starts here
            captured["act"] = act
            return act.clone()  # later in-place ops (ReLU) must not alter what we keep

        layer = gradcam_layer(self.model, self.meta.architecture)
        handle = layer.register_forward_hook(hook)
        try:
            with gpu_memory_is_transient(), torch.inference_mode(False), torch.enable_grad():
                for i, image in enumerate(images01):
                    x, (box,) = prepare_batch([image], self.meta)
                    logits = self._logits(x)
                    with self._policy(autocast=False):
                        (grads,) = torch.autograd.grad(logits[0, self._target], captured["act"])
                    square = gradcam_squares(captured["act"], grads, x.shape[-1])[0]
                    maps.append(to_source(unit(square), box))
                    c, p = findings(logits.detach().cpu(), self.meta)
                    covid[i] = float(c[0])
                    if pneu is not None and p is not None:
                        pneu[i] = float(p[0])
        finally:
            handle.remove()
            captured.clear()
        return maps, covid, pneu

    def occlusion(self, image01: np.ndarray, size: int = 32, stride: int = 16,
                  batch: int = 64) -> np.ndarray:
        """Occlusion sensitivity: the mean drop in P(COVID-19) where a patch hides each
        pixel.  The occluded copies go through the same forward in batches of ``batch``
        (a map, unlike a score, may differ in its last bits with the batch)."""
        if size < 1 or stride < 1 or batch < 1:
            raise ValueError("occlusion size, stride and batch must be positive")
        x, (box,) = prepare_batch([image01], self.meta)  # on the CPU, as every score
        x = x.to(self.device)
        side = x.shape[-1]
        size = min(size, side)
        windows = occlusion_windows(side, size, stride, box)
        drops = np.zeros(len(windows), dtype=np.float32)
        with gpu_memory_is_transient(), torch.inference_mode():
            base = self._covid(x)[0]
            for start in range(0, len(windows), batch):
                chunk = windows[start : start + batch]
                drops[start : start + len(chunk)] = (base - self._covid(occlude(x, chunk, size))
                                                     ).numpy()
        return to_source(unit(sensitivity_square(drops, windows, size, side)), box)

    def heatmap(self, image01: np.ndarray, settings: Settings) -> np.ndarray:
        """The map ``settings.heatmap_method`` chooses, for one image."""
        if settings.heatmap_method == "occlusion":
            return self.occlusion(image01, settings.occlusion_size, settings.occlusion_stride,
                                  settings.occlusion_batch)
        if settings.heatmap_method == "gradcam":
            return self.findings_and_gradcam([image01])[0][0]
        raise ValueError(f"heatmap method {settings.heatmap_method!r} must be one of {METHODS}")


__all__ = ["DECODE_CHUNK", "Scorer", "autocast_dtype", "gpu_memory_is_transient"]
