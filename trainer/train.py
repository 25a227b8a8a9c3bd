"""Transfer learning: fine-tune a champion (or an ImageNet backbone) on labelled images.

As in the seed papers, the early layers keep their pretrained weights: stages before the
cutoff are frozen, so their outputs are cached (:mod:`trainer.features`) and each epoch
only runs the trainable stages.  Training is staged: first the single-logit head alone at
a higher learning rate, then every stage after the cutoff at a lower one.  Class imbalance
is handled by weighting positives in the loss (``pos_weight`` = negatives/positives).
Early stopping keeps the epoch with the best validation AUC.  The operating threshold is
chosen on validation patients for ``target_sensitivity``.

Augmentation (cached as a few fixed random views per image): small rotations, shifts,
scale, gamma, brightness and contrast; no flips, since a mirrored chest X-ray puts the
heart on the wrong side, a picture the model never meets in practice.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from db.settings import Settings
from dicom_node.pixels import load_image_file
from trainer.architectures import build_model, freeze_until, stage_names, train_mode
from trainer.checkpoint import (
    LoadedModel,
    ModelMeta,
    Preprocessing,
    Provenance,
    resolve_device,
)
from trainer.datasets import ImageRecord, data_digest, describe
from trainer.features import (
    FeatureCache,
    compute_features,
    cutoff_index,
    prefix_digest,
    split_model,
)
from trainer.metrics import evaluate_scores, roc_auc, threshold_for_sensitivity
from trainer.progress import progress, track
from trainer.transforms import Augmentation, augment, normalise, prepare_squares

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot proceed with this data (e.g. one class only)."""


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
    augmentation: Augmentation = field(default_factory=Augmentation)

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


@dataclass
class TrainResult:
    model: nn.Module
    meta: ModelMeta
    history: list[dict[str, Any]]
    val_metrics: dict[str, Any]
    val_scores: np.ndarray
    timings: dict[str, float]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def load_squares(records: Sequence[ImageRecord], meta: ModelMeta) -> torch.Tensor:
    """N x 1 x S x S squares in [0, 1] through the inference pixel pipeline."""
    images = [load_image_file(r.path) for r in records]
    squares, _ = prepare_squares(images, meta)
    return torch.from_numpy(squares).unsqueeze(1)


def _view_generator(key: str, view: int) -> torch.Generator:
    digest = hashlib.sha256(f"{key}|{view}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def _inputs_for(records: Sequence[ImageRecord], meta: ModelMeta,
                aug: Augmentation) -> Any:
    def to_input(squares: torch.Tensor, idx: Sequence[int], view: int) -> torch.Tensor:
        if view == 0:
            return normalise(squares, meta.preprocessing)
        views = [augment(squares[j:j + 1], _view_generator(records[i].key, view), aug)
                 for j, i in enumerate(idx)]
        return normalise(torch.cat(views), meta.preprocessing)
    return to_input


def extract(prefix: nn.Module, records: Sequence[ImageRecord], meta: ModelMeta, views: int,
            cache: FeatureCache | None, device: torch.device, cfg: TrainConfig,
            desc: str) -> torch.Tensor:
    """Cached prefix features ``(N, views, C, H, W)`` for ``records``."""
    with progress(len(records), desc, unit="img") as bar:
        return compute_features(
            prefix, [r.key for r in records], views,
            lambda idx: load_squares([records[i] for i in idx], meta),
            _inputs_for(records, meta, cfg.augmentation),
            cache=cache, device=device, batch_size=cfg.feature_batch, progress=bar.update,
        )


def _predict(suffix: nn.Module, feats: torch.Tensor, device: torch.device,
             batch: int = 128) -> np.ndarray:
    suffix.eval()
    out = []
    with torch.inference_mode(), _autocast(device):
        for s in range(0, feats.shape[0], batch):
            out.append(torch.sigmoid(suffix(feats[s:s + batch].to(device)).float()).cpu())
    return torch.cat(out).view(-1).numpy() if out else np.zeros(0)


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", enabled=False)


def _run_stage(
    name: str, model: nn.Module, suffix: nn.Module, arch: str, frozen: int, lr: float,
    epochs: int, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
    val_y: np.ndarray, cfg: TrainConfig, device: torch.device, history: list[dict[str, Any]],
    best: dict[str, Any], train_w: torch.Tensor | None = None,
) -> None:
    """One training stage; updates ``best`` (score, state, epoch) in place."""
    freeze_until(model, arch, frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    n_pos = float(train_y.sum())
    n_neg = float(train_y.numel() - n_pos)
    pos_weight = torch.tensor(n_neg / max(n_pos, 1.0), device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=None if train_w is not None else pos_weight,
                                   reduction="none")
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed + len(history))
    n, views = train_x.shape[0], train_x.shape[1]
    stale = 0
    for stage_epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        train_mode(model)
        order = torch.randperm(n, generator=gen)
        pick = torch.randint(0, views, (n,), generator=gen)
        total = 0.0
        batches = range(0, n, cfg.batch_size)
        for s in track(batches, len(batches), f"{name} epoch {stage_epoch}/{epochs}", "batch"):
            idx = order[s:s + cfg.batch_size]
            if idx.numel() < 2 and n >= 2:
                continue  # BatchNorm cannot train on a single sample
            x = train_x[idx, pick[idx]].to(device)
            y = train_y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            with _autocast(device):
                per = loss_fn(suffix(x).view(-1).float(), y)
                loss = (per * train_w[idx].to(device)).mean() if train_w is not None else per.mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += float(loss.detach()) * idx.numel()
        val_p = _predict(suffix, val_x[:, 0], device)
        auc = roc_auc(val_y, val_p)
        eps = 1e-6
        val_loss = float(-np.mean(val_y * np.log(val_p + eps)
                                  + (1 - val_y) * np.log(1 - val_p + eps)))
        # AUC first; validation loss breaks ties (small validation sets often saturate AUC)
        score = (auc if auc is not None else 0.0, -val_loss)
        row = {"epoch": len(history) + 1, "stage": name, "train_loss": total / max(n, 1),
               "val_loss": val_loss, "val_auc": auc, "seconds": time.perf_counter() - t0}
        history.append(row)
        log.info("epoch %d/%d stage=%s train_loss=%.4f val_loss=%.4f val_auc=%s time=%.1fs",
                 stage_epoch, epochs, name, row["train_loss"], val_loss,
                 "n/a" if auc is None else f"{auc:.4f}", row["seconds"])
        if best["score"] is None or score > best["score"]:
            best.update(score=score, state=copy.deepcopy(model.state_dict()), epoch=row["epoch"])
            stale = 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break


def feature_cache(model: nn.Module, arch: str, k: int, meta: ModelMeta, cfg: TrainConfig,
                  cache_root: Path | None) -> FeatureCache | None:
    """The cache for this frozen prefix, preprocessing and augmentation (None: no cache)."""
    if cache_root is None:
        return None
    digest = prefix_digest(model, arch, k, {"size": meta.input_size,
                                            "prep": meta.to_dict()["preprocessing"],
                                            "aug": repr(cfg.augmentation)})
    return FeatureCache(cache_root, digest)


def sample_weights(records: Sequence[ImageRecord], mode: str) -> torch.Tensor | None:
    """Per-image loss weights for ``balance="source_class"`` (mean 1); None for "class"."""
    if mode == "class":
        return None
    if mode != "source_class":
        raise ValueError(f"balance {mode!r} must be class or source_class")
    cells: dict[tuple[str, int], int] = {}
    for r in records:
        cells[(r.source, r.label)] = cells.get((r.source, r.label), 0) + 1
    n, c = len(records), len(cells)
    return torch.tensor([n / (c * cells[(r.source, r.label)]) for r in records],
                        dtype=torch.float32)


def fit_on_features(model: nn.Module, arch: str, k: int, suffix: nn.Module,
                    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                    val_y: np.ndarray, cfg: TrainConfig,
                    device: torch.device,
                    train_w: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Staged training of the stages after the cutoff on cached features.

    Leaves ``model`` at the epoch with the best validation AUC, in eval mode and frozen.
    """
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": None, "state": None, "epoch": 0}
    head_stage = len(stage_names(model, arch)) - 1
    if cfg.head_epochs > 0 and head_stage > k:
        _run_stage("head", model, suffix, arch, head_stage, cfg.lr_head, cfg.head_epochs,
                   train_x, train_y, val_x, val_y, cfg, device, history, best, train_w)
    if cfg.epochs > 0:
        _run_stage("unfrozen", model, suffix, arch, k,
                   cfg.lr_body if head_stage > k else cfg.lr_head, cfg.epochs,
                   train_x, train_y, val_x, val_y, cfg, device, history, best, train_w)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if history:
        history[-1]["best_epoch"] = best["epoch"]
    return history


def train_model(
    train: Sequence[ImageRecord],
    val: Sequence[ImageRecord],
    cfg: TrainConfig,
    *,
    init: LoadedModel | None = None,
    cache_root: Path | None = None,
    parent_version: str | None = None,
) -> TrainResult:
    """Fine-tune from ``init`` (the champion) or ImageNet; return the best model and meta."""
    if len({r.label for r in train}) < 2:
        raise TrainingError("the training split holds only one class")
    if not val:
        raise TrainingError("the validation split is empty")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    timings: dict[str, float] = {}
    if init is not None:
        model = copy.deepcopy(init.model).cpu()
        arch, size, prep = init.meta.architecture, init.meta.input_size, init.meta.preprocessing
    else:
        arch, size = cfg.architecture, cfg.input_size
        model = build_model(arch, pretrained=True)
        prep = Preprocessing.for_backbone(arch, cfg.contrast)
    meta = ModelMeta(architecture=arch, input_size=size, preprocessing=prep)
    model.to(device)
    k = cutoff_index(model, arch, cfg.cutoff)
    freeze_until(model, arch, k)
    prefix, suffix = split_model(model, arch, k)
    cache = feature_cache(model, arch, k, meta, cfg, cache_root)
    t0 = time.perf_counter()
    train_x = extract(prefix, train, meta, cfg.views, cache, device, cfg, "features train")
    val_x = extract(prefix, val, meta, 1, cache, device, cfg, "features val")
    timings["features_s"] = time.perf_counter() - t0
    log.info("features ready train=%d val=%d shape=%s cache_hits=%d time=%.1fs", len(train),
             len(val), tuple(train_x.shape[2:]), cache.hits if cache else 0, timings["features_s"])
    train_y = torch.tensor([float(r.label) for r in train])
    val_y = np.array([r.label for r in val], dtype=np.int64)
    t1 = time.perf_counter()
    history = fit_on_features(model, arch, k, suffix, train_x, train_y, val_x, val_y, cfg,
                              device, sample_weights(train, cfg.balance))
    timings["train_s"] = time.perf_counter() - t1
    val_p = _predict(suffix, val_x[:, 0], device)
    if val_y.any():
        threshold = threshold_for_sensitivity(val_y, val_p, cfg.target_sensitivity)
    else:
        threshold = 0.5
        log.warning("validation split has no positives; threshold left at 0.5")
    val_metrics = evaluate_scores(val_y, val_p, threshold, groups=[r.source for r in val])
    records = list(train) + list(val)
    meta = replace(meta, threshold=threshold, provenance=Provenance(
        data_digest=data_digest(records), parent_version=parent_version,
        metrics={k2: float(v) for k2, v in (("val_auc", val_metrics["auc"]),
                                             ("val_sensitivity", val_metrics["sensitivity"]),
                                             ("val_specificity", val_metrics["specificity"]))
                 if v is not None},
        extra={"config": {k2: str(v) for k2, v in cfg.public().items()},
               "best_epoch": history[-1].get("best_epoch") if history else None,
               "cutoff_stage": k,
               "train": describe(train), "validation": describe(val)},
    ))
    return TrainResult(model=model.cpu(), meta=meta, history=history, val_metrics=val_metrics,
                       val_scores=val_p, timings=timings)


__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "extract",
    "feature_cache",
    "fit_on_features",
    "load_squares",
    "sample_weights",
    "train_model",
]
