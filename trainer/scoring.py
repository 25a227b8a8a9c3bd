"""Probabilities for a study's images in one forward pass, on the fastest device at hand.

On CUDA the forward runs under autocast (bfloat16 where supported, else float16); on CPU
the model is kept channels_last, which oneDNN runs faster for most of our backbones.  Both
run under ``torch.inference_mode``.  A CUDA out-of-memory error is the infrastructure's
trouble, not the study's, so it surfaces as :class:`TransientError` and the worker retries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from db.errors import TransientError
from dicom_node.pixels import load_image_file
from trainer.checkpoint import LoadedModel, findings, resolve_device
from trainer.transforms import to_tensor_batch

log = logging.getLogger(__name__)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision used on ``device``, or None for full float32."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextmanager
def gpu_memory_is_transient() -> Iterator[None]:
    """Turn CUDA out-of-memory into a retryable :class:`TransientError`."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise TransientError(f"GPU out of memory: {exc}") from exc


class Scorer:
    """Scores batches of [0, 1] images (or prepared tensors) with a loaded checkpoint."""

    def __init__(
        self, loaded: LoadedModel, device: str | torch.device = "auto",
        channels_last: bool | None = None,
    ) -> None:
        self.loaded = loaded
        self.meta = loaded.meta
        self.device = resolve_device(device)
        self.channels_last = (self.device.type == "cpu") if channels_last is None else channels_last
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = loaded.model.to(self.device).to(memory_format=self.memory_format).eval()
        loaded.device = self.device
        self.amp_dtype = autocast_dtype(self.device)

    def prepare(self, images01: Sequence[np.ndarray]) -> torch.Tensor:
        """Letterbox, contrast and normalise exactly as in training."""
        return to_tensor_batch(images01, self.meta)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw logits (float32, on CPU, N x outputs) of a prepared N x 3 x S x S batch."""
        with gpu_memory_is_transient(), torch.inference_mode():
            x = batch.to(self.device, non_blocking=True).contiguous(
                memory_format=self.memory_format
            )
            if self.amp_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.amp_dtype):
                    out = self.model(x)
            else:
                out = self.model(x)
            logits: torch.Tensor = out.float().reshape(out.shape[0], -1).cpu()
            return logits

    def predict(self, batch: Sequence[np.ndarray] | torch.Tensor) -> np.ndarray:
        """COVID-19 probabilities (float64, one per image) from images in [0, 1] or a
        prepared batch."""
        return self.predict_findings(batch)[0]

    def predict_findings(self, batch: Sequence[np.ndarray] | torch.Tensor,
                         ) -> tuple[np.ndarray, np.ndarray | None]:
        """(P(COVID-19), P(pneumonia pattern)) per image; the second is None for a
        two-class model."""
        if len(batch) == 0:
            empty = np.zeros(0, dtype=np.float64)
            return empty, (empty.copy() if self.meta.has_pneumonia else None)
        tensor = batch if isinstance(batch, torch.Tensor) else self.prepare(batch)
        covid, pneu = findings(self.logits(tensor), self.meta)
        return (covid.double().numpy(),
                None if pneu is None else pneu.double().numpy())

    def predict_files(self, paths: Sequence[Path], pool: ThreadPoolExecutor | None = None,
                      ) -> np.ndarray:
        """Decode (in ``pool`` when given) and score DICOM, PNG or JPEG files."""
        if pool is None:
            images = [load_image_file(p) for p in paths]
        else:
            images = list(pool.map(load_image_file, paths))
        return self.predict(images)


__all__ = ["Scorer", "autocast_dtype", "gpu_memory_is_transient"]
