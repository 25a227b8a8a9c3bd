"""Transfer learning: fine-tune a champion (or an ImageNet backbone) on labelled images.

As in the seed papers, the early layers keep their pretrained weights: stages before the
cutoff are frozen, so their outputs are cached (:mod:`trainer.features`) and each epoch
only runs the trainable stages.  Training is staged: first the head alone at a higher
learning rate, then every stage after the cutoff at a lower one.

The default head is a softmax over normal / other pneumonia / COVID-19 (as in
Apostolopoulos et al.).  A study known only as "not COVID-19" (a 0/1 label without a
``label_name``) is a partial label: its loss is -log(P(normal) + P(other pneumonia)), so it
trains the COVID-19 objective and says nothing about pneumonia (the masked loss).  Each
label category weighs the same in the loss.  ``classes="two"`` keeps the single-logit
head of earlier versions (positives weighted by negatives/positives).

Early stopping keeps the epoch with the best validation COVID-19 AUC on the cached
features (:mod:`trainer.fit`).  The chosen model then scores the validation images
through the one scorer (:class:`trainer.scoring.Scorer`: the whole network on the pixel
pipeline, at the precision recorded in the model file), and each finding's operating
threshold (COVID-19, and the pneumonia pattern P(covid) + P(other pneumonia)) is chosen
on those scores for ``target_sensitivity``: the very scores the worker computes for the
same images.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dicom_node.pixels import load_image_file
from trainer.architectures import build_model, freeze_until
from trainer.checkpoint import (
    THREE_CLASSES,
    TWO_CLASSES,
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
from trainer.fit import fit_on_features
from trainer.metrics import evaluate_scores, threshold_for_sensitivity
from trainer.progress import progress
from trainer.scoring import Scorer
from trainer.targets import allowed_classes, pneumonia_truth, sample_weights
from trainer.train_config import TrainConfig
from trainer.transforms import Augmentation, augment, normalise, prepare_squares

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot proceed with this data (e.g. one class only)."""


@dataclass
class TrainResult:
    """The chosen model and its meta; the validation scores are the scorer's, the ones
    its thresholds were chosen on (P(COVID-19), and the pneumonia pattern's or None)."""

    model: nn.Module
    meta: ModelMeta
    history: list[dict[str, Any]]
    val_metrics: dict[str, Any]
    val_scores: np.ndarray
    timings: dict[str, float]
    val_pneumonia_scores: np.ndarray | None = None


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


def feature_cache(model: nn.Module, arch: str, k: int, meta: ModelMeta, cfg: TrainConfig,
                  cache_root: Path | None) -> FeatureCache | None:
    """The cache for this frozen prefix, preprocessing and augmentation (None: no cache)."""
    if cache_root is None:
        return None
    digest = prefix_digest(model, arch, k, {"size": meta.input_size,
                                            "prep": meta.to_dict()["preprocessing"],
                                            "aug": repr(cfg.augmentation)})
    return FeatureCache(cache_root, digest)


def operating_points(val: Sequence[ImageRecord], val_p: np.ndarray,
                     val_pneu: np.ndarray | None, target_sensitivity: float,
                     ) -> tuple[float, float | None, dict[str, Any]]:
    """Each finding's threshold for ``target_sensitivity`` on the validation scores (the
    pneumonia pattern's on the images whose class is known), and the validation figures."""
    val_y = np.array([r.label for r in val], dtype=np.int64)
    if val_y.any():
        threshold = threshold_for_sensitivity(val_y, val_p, target_sensitivity)
    else:
        threshold = 0.5
        log.warning("validation split has no positives; threshold left at 0.5")
    val_metrics = evaluate_scores(val_y, val_p, threshold, groups=[r.source for r in val])
    pneumonia_threshold: float | None = None
    if val_pneu is not None:
        known = pneumonia_truth(val)
        keep = known >= 0
        if (known[keep] == 1).any():
            pneumonia_threshold = threshold_for_sensitivity(known[keep], val_pneu[keep],
                                                            target_sensitivity)
        else:
            pneumonia_threshold = 0.5
            log.warning("validation split has no known pneumonia; its threshold left at 0.5")
        if len(set(known[keep].tolist())) == 2:
            pm = evaluate_scores(known[keep], val_pneu[keep], pneumonia_threshold)
            val_metrics["pneumonia_auc"] = pm["auc"]
            val_metrics["pneumonia_sensitivity"] = pm["sensitivity"]
            val_metrics["pneumonia_specificity"] = pm["specificity"]
    return threshold, pneumonia_threshold, val_metrics


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
    if cfg.classes not in ("two", "three"):
        raise ValueError(f"classes {cfg.classes!r} must be two or three")
    classes = THREE_CLASSES if cfg.classes == "three" else TWO_CLASSES
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    timings: dict[str, float] = {}
    outputs = 1 if classes == TWO_CLASSES else len(classes)
    if init is not None:
        arch, size, prep = init.meta.architecture, init.meta.input_size, init.meta.preprocessing
        if init.meta.classes == classes:
            model = copy.deepcopy(init.model).cpu()
        else:
            # a champion with other classes: keep its backbone, start a fresh head
            model = build_model(arch, pretrained=False, outputs=outputs)
            own = model.state_dict()
            state = {k: v for k, v in init.model.state_dict().items()
                     if k in own and own[k].shape == v.shape}
            model.load_state_dict(state, strict=False)
    else:
        arch, size = cfg.architecture, cfg.input_size
        model = build_model(arch, pretrained=True, outputs=outputs)
        prep = Preprocessing.for_backbone(arch, cfg.contrast)
    meta = ModelMeta(architecture=arch, input_size=size, preprocessing=prep, classes=classes,
                     precision=cfg.precision)
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
    train_y = allowed_classes(train, classes)
    val_y = np.array([r.label for r in val], dtype=np.int64)
    t1 = time.perf_counter()
    history = fit_on_features(model, arch, k, suffix, train_x, train_y, val_x, val_y, cfg,
                              device, sample_weights(train, cfg.balance, outputs > 1), meta)
    timings["train_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    scorer = Scorer(LoadedModel(model=model, meta=meta, sha256=""), device)
    with progress(len(val), "scoring validation", unit="img") as bar:
        val_p, val_pneu = scorer.predict_findings_files([r.path for r in val],
                                                        progress=bar.update)
    timings["score_val_s"] = time.perf_counter() - t2
    threshold, pneumonia_threshold, val_metrics = operating_points(
        val, val_p, val_pneu, cfg.target_sensitivity)
    records = list(train) + list(val)
    meta = replace(meta, threshold=threshold, pneumonia_threshold=pneumonia_threshold,
                   provenance=Provenance(
        data_digest=data_digest(records), parent_version=parent_version,
        metrics={k2: float(v) for k2, v in (
            ("val_auc", val_metrics["auc"]),
            ("val_sensitivity", val_metrics["sensitivity"]),
            ("val_specificity", val_metrics["specificity"]),
            ("val_pneumonia_auc", val_metrics.get("pneumonia_auc")))
                 if v is not None},
        extra={"config": {k2: str(v) for k2, v in cfg.public().items()},
               "best_epoch": history[-1].get("best_epoch") if history else None,
               "cutoff_stage": k,
               "train": describe(train), "validation": describe(val)},
    ))
    return TrainResult(model=model.cpu(), meta=meta, history=history, val_metrics=val_metrics,
                       val_scores=val_p, timings=timings, val_pneumonia_scores=val_pneu)


__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "extract",
    "feature_cache",
    "load_squares",
    "operating_points",
    "seed_everything",
    "train_model",
]
