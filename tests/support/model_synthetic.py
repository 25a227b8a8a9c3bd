"""A tiny CNN trained in seconds on synthetic images whose class signal sits in a known
region, so heatmap methods can be checked against ground truth."""

from __future__ import annotations

import numpy as np
import torch

from trainer.architectures import build_model
from trainer.checkpoint import LoadedModel, ModelMeta, Preprocessing
from trainer.transforms import to_tensor_batch

SIZE = 64
# The positive class carries a bright disc centred here (row, col) on a 64 x 64 image.
SIGNAL_CENTRE = (16, 44)
SIGNAL_RADIUS = 6


def synthetic_image(positive: bool, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Smooth noisy background; positives get a bright disc at SIGNAL_CENTRE (scaled)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = 0.35 + 0.1 * np.sin(xx / size * np.pi) + rng.normal(0, 0.05, (size, size))
    if positive:
        f = size / SIZE
        cy, cx = SIGNAL_CENTRE[0] * f, SIGNAL_CENTRE[1] * f
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) <= (SIGNAL_RADIUS * f) ** 2
        img = img + 0.45 * disc
    return np.clip(img, 0, 1).astype(np.float32)


def tiny_meta(threshold: float = 0.5) -> ModelMeta:
    return ModelMeta(architecture="tiny_cnn", input_size=SIZE,
                     preprocessing=Preprocessing.for_backbone("tiny_cnn"), threshold=threshold)


def train_tiny_model(steps: int = 60, seed: int = 0) -> LoadedModel:
    """tiny_cnn trained to tell images with the disc from those without (CPU, seconds).

    One intra-op thread: on a loaded 2-core machine that is several times faster for a
    model this small than contending for both cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(steps: int, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    meta = tiny_meta()
    model = build_model("tiny_cnn", pretrained=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(steps):
        labels = rng.integers(0, 2, 16)
        x = to_tensor_batch([synthetic_image(bool(y), rng) for y in labels], meta)
        loss = loss_fn(model(x).reshape(-1), torch.tensor(labels, dtype=torch.float32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return LoadedModel(model=model, meta=meta, sha256="")
