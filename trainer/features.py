"""Split a network at the freezing cutoff, and cache what the frozen part computes.

With the first stages frozen, their output for a given image (and a given augmentation)
never changes, so it is computed once and kept on disk.  Training then runs only the
trainable stages: on this 2-core CPU a frozen EfficientNet-Lite0 pass costs about a
quarter of a training step, and a nightly run re-uses the features of every image seen
on earlier nights.

The cache key holds everything the features depend on: the digest of the frozen weights,
the architecture, input size, preprocessing, cutoff and the augmentation of each view.
A changed champion prefix or preprocessing therefore never re-uses stale features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.architectures import stage_names, stages

log = logging.getLogger(__name__)

CACHE_VERSION = "features/1"


def cutoff_index(model: nn.Module, architecture: str, cutoff: int | str) -> int:
    """The number of frozen stages for a cutoff given as an index or a stage name."""
    names = stage_names(model, architecture)
    if isinstance(cutoff, str):
        if cutoff not in names:
            raise ValueError(f"{architecture} has no stage {cutoff!r}; stages: {', '.join(names)}")
        return names.index(cutoff)
    return max(0, min(int(cutoff), len(names) - 1))


def supports_split(architecture: str) -> bool:
    return architecture == "efficientnet_lite0" or architecture.startswith("resnet")


class _Part(nn.Module):
    """One side of a backbone split at stage ``k`` (shares the backbone's modules)."""

    def __init__(self, model: nn.Module, architecture: str, k: int) -> None:
        super().__init__()
        self.m: Any = model
        self.arch = architecture
        self.k = k


class _Prefix(_Part):
    """Stages ``[0, k)`` of a backbone, with the activations that sit between stages."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, k = self.m, self.k
        if self.arch == "efficientnet_lite0":
            if k >= 1:
                x = m._stem_act(m._bn0(m._conv_stem(x)))
            for i in range(min(k - 1, len(m._blocks))):
                x = m._blocks[i](x)
            if k >= len(m._blocks) + 2:
                x = m._head_act(m._bn1(m._conv_head(x)))
            return x
        # resnet: stem, layer1..layer4, head
        if k >= 1:
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for i, layer in enumerate((m.layer1, m.layer2, m.layer3, m.layer4), start=2):
            if k >= i:
                x = layer(x)
        return x


class _Suffix(_Part):
    """Stages ``[k, end)``: turns cached features into one logit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, k = self.m, self.k
        if self.arch == "efficientnet_lite0":
            nb = len(m._blocks)
            if k < 1:
                x = m._stem_act(m._bn0(m._conv_stem(x)))
            for i in range(max(k - 1, 0), nb):
                x = m._blocks[i](x)
            if k < nb + 2:
                x = m._head_act(m._bn1(m._conv_head(x)))
            x = m._avg_pooling(x).flatten(1)
            return m._fc(m._dropout(x))  # type: ignore[no-any-return]
        if k < 1:
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for i, layer in enumerate((m.layer1, m.layer2, m.layer3, m.layer4), start=2):
            if k < i:
                x = layer(x)
        return m.fc(torch.flatten(m.avgpool(x), 1))  # type: ignore[no-any-return]


def split_model(model: nn.Module, architecture: str, k: int) -> tuple[nn.Module, nn.Module]:
    """(prefix, suffix) sharing ``model``'s modules: ``suffix(prefix(x)) == model(x)``."""
    if not supports_split(architecture):
        raise ValueError(f"feature caching is not implemented for {architecture}")
    return _Prefix(model, architecture, k), _Suffix(model, architecture, k)


def prefix_digest(model: nn.Module, architecture: str, k: int, extra: dict[str, Any]) -> str:
    """A digest of the frozen weights and every setting the cached features depend on."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "arch": architecture, "k": k, **extra},
                        sort_keys=True, default=str).encode())
    names = stage_names(model, architecture)[:k]
    modules = dict(stages(model, architecture))
    for name in names:
        for pname, tensor in modules[name].state_dict().items():
            h.update(f"{name}.{pname}".encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


class FeatureCache:
    """``.npy`` files (float16) under ``root/<prefix digest>/``, one per image view."""

    def __init__(self, root: Path, digest: str) -> None:
        self.dir = Path(root) / digest
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str, view: int) -> Path:
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.dir / name[:2] / f"{name}-{view}.npy"

    def get(self, key: str, view: int) -> np.ndarray | None:
        path = self._path(key, view)
        try:
            arr: np.ndarray = np.load(path)
        except (OSError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        return arr

    def put(self, key: str, view: int, value: np.ndarray) -> None:
        path = self._path(key, view)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, value.astype(np.float16))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def compute_features(
    prefix: nn.Module,
    keys: Sequence[str],
    views: int,
    load_squares: Callable[[Sequence[int]], torch.Tensor],
    to_input: Callable[[torch.Tensor, Sequence[int], int], torch.Tensor],
    *,
    cache: FeatureCache | None,
    device: torch.device,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Features of every (image, view): shape ``(len(keys), views, C, H, W)``, float32 on CPU.

    ``load_squares(indices)`` gives those images' N x 1 x S x S squares in [0, 1] (read once
    per batch); ``to_input(squares, indices, view)`` makes the network input for one view
    (view 0 unaugmented).  Cached entries are read; missing ones are computed and stored.
    """
    prefix.eval()
    rows: list[list[torch.Tensor | None]] = [[None] * views for _ in keys]
    missing: list[int] = []
    for i, key in enumerate(keys):
        for view in range(views):
            got = cache.get(key, view) if cache is not None else None
            if got is not None:
                rows[i][view] = torch.from_numpy(got.astype(np.float32))
        if any(v is None for v in rows[i]):
            missing.append(i)
    if progress is not None and len(keys) > len(missing):
        progress(len(keys) - len(missing))
    for start in range(0, len(missing), batch_size):
        idx = missing[start:start + batch_size]
        squares = load_squares(idx)
        for view in range(views):
            x = to_input(squares, idx, view).to(device)
            with torch.inference_mode(), _autocast(device):
                feats = prefix(x).float().cpu()
            for j, i in enumerate(idx):
                f = feats[j].clone()
                if cache is not None:
                    cache.put(keys[i], view, f.numpy())
                # the float16 value, so a cached and a fresh run agree exactly
                rows[i][view] = f.half().float()
        if progress is not None:
            progress(len(idx))
    return torch.stack([torch.stack([t for t in r if t is not None]) for r in rows])


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", enabled=False)


__all__ = [
    "FeatureCache",
    "compute_features",
    "cutoff_index",
    "prefix_digest",
    "split_model",
    "supports_split",
]
