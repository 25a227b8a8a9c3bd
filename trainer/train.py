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

Early stopping keeps the epoch with the best validation COVID-19 AUC.  Each finding's
operating threshold (COVID-19, and the pneumonia pattern P(covid) + P(other pneumonia))
is chosen on validation patients for ``target_sensitivity``.

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
    THREE_CLASSES,
    TWO_CLASSES,
    LoadedModel,
    ModelMeta,
    Preprocessing,
    Provenance,
    findings,
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
    # "three": softmax over normal / other pneumonia / COVID-19; "two": one COVID-19 logit
    classes: str = "three"
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


def category(record: ImageRecord) -> str:
    """What the label says: a class name, or ``not_covid`` for a bare 0 label."""
    if record.label_name is not None:
        return record.label_name
    return "covid" if record.label else "not_covid"


def allowed_classes(records: Sequence[ImageRecord], classes: tuple[str, ...]) -> torch.Tensor:
    """N x outputs mask of the classes each label allows (the masked loss's target).

    Two-class models have one output: the mask is then the 0/1 COVID-19 target.
    """
    if classes == TWO_CLASSES:
        return torch.tensor([[float(r.label)] for r in records])
    rows = []
    for r in records:
        cat = category(r)
        rows.append([1.0 if (c == cat or (cat == "not_covid" and c != "covid")) else 0.0
                     for c in classes])
    return torch.tensor(rows)


def masked_loss(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Per-sample -log P(true class set): log-sum-exp over the allowed classes."""
    logits = logits.float()
    masked = logits.masked_fill(allowed <= 0, float("-inf"))
    return torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)


def pneumonia_truth(records: Sequence[ImageRecord]) -> np.ndarray:
    """1 pneumonia pattern (covid, other pneumonia), 0 normal, -1 unknown (bare 0 label)."""
    out = []
    for r in records:
        cat = category(r)
        out.append(-1 if cat == "not_covid" else int(cat != "normal"))
    return np.array(out, dtype=np.int64)


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


def _predict_findings(suffix: nn.Module, feats: torch.Tensor, device: torch.device,
                      meta: ModelMeta, batch: int = 128) -> tuple[np.ndarray, np.ndarray | None]:
    """(P(COVID-19), P(pneumonia pattern) or None) from cached features."""
    suffix.eval()
    covid, pneu = [], []
    with torch.inference_mode(), _autocast(device):
        for s in range(0, feats.shape[0], batch):
            c, p = findings(suffix(feats[s:s + batch].to(device)).float().cpu(), meta)
            covid.append(c)
            if p is not None:
                pneu.append(p)
    if not covid:
        return np.zeros(0), (np.zeros(0) if meta.has_pneumonia else None)
    return (torch.cat(covid).numpy().astype(np.float64),
            torch.cat(pneu).numpy().astype(np.float64) if pneu else None)


def _predict(suffix: nn.Module, feats: torch.Tensor, device: torch.device,
             batch: int = 128, meta: ModelMeta | None = None) -> np.ndarray:
    """P(COVID-19) from cached features (single-logit head unless ``meta`` says otherwise)."""
    meta = meta or ModelMeta("tiny_cnn", 1, Preprocessing())
    return _predict_findings(suffix, feats, device, meta, batch)[0]


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", enabled=False)


def _run_stage(
    name: str, model: nn.Module, suffix: nn.Module, arch: str, frozen: int, lr: float,
    epochs: int, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
    val_y: np.ndarray, cfg: TrainConfig, device: torch.device, history: list[dict[str, Any]],
    best: dict[str, Any], train_w: torch.Tensor | None = None,
    meta: ModelMeta | None = None,
) -> None:
    """One training stage; updates ``best`` (score, state, epoch) in place.

    ``train_y`` is N x outputs: the 0/1 COVID-19 target of a single-logit head, or the
    mask of allowed classes of a softmax head.
    """
    meta = meta or ModelMeta("tiny_cnn", 1, Preprocessing())
    freeze_until(model, arch, frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    if train_y.dim() == 1:
        train_y = train_y.view(-1, 1)
    softmax = train_y.shape[1] > 1
    n_pos = float(train_y.sum()) if not softmax else 0.0
    n_neg = float(train_y.shape[0] - n_pos)
    pos_weight = torch.tensor(n_neg / max(n_pos, 1.0), device=device)
    bce = nn.BCEWithLogitsLoss(pos_weight=None if train_w is not None else pos_weight,
                               reduction="none")

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if softmax:
            return masked_loss(logits, y)
        return bce(logits.view(-1).float(), y.view(-1))  # type: ignore[no-any-return]

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
                per = loss_fn(suffix(x).float(), y)
                loss = (per * train_w[idx].to(device)).mean() if train_w is not None else per.mean()
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            scaler.step(opt)
            scaler.update()
            total += float(loss.detach()) * idx.numel()
        val_p = _predict_findings(suffix, val_x[:, 0], device, meta)[0]
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


def sample_weights(records: Sequence[ImageRecord], mode: str,
                   three: bool = False) -> torch.Tensor | None:
    """Per-image loss weights (mean 1): every label category weighs the same (``class``,
    three-class only; two-class models weight positives in the loss instead), or every
    (source, category) cell does (``source_class``).  None: no weights."""
    if mode not in ("class", "source_class"):
        raise ValueError(f"balance {mode!r} must be class or source_class")
    if mode == "class" and not three:
        return None
    cells: dict[tuple[str, str], int] = {}

    def cell(r: ImageRecord) -> tuple[str, str]:
        cat = category(r) if three else str(r.label)
        return (r.source if mode == "source_class" else "", cat)

    for r in records:
        cells[cell(r)] = cells.get(cell(r), 0) + 1
    n, c = len(records), len(cells)
    return torch.tensor([n / (c * cells[cell(r)]) for r in records], dtype=torch.float32)


def fit_on_features(model: nn.Module, arch: str, k: int, suffix: nn.Module,
                    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                    val_y: np.ndarray, cfg: TrainConfig,
                    device: torch.device,
                    train_w: torch.Tensor | None = None,
                    meta: ModelMeta | None = None) -> list[dict[str, Any]]:
    """Staged training of the stages after the cutoff on cached features.

    Leaves ``model`` at the epoch with the best validation AUC, in eval mode and frozen.
    """
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": None, "state": None, "epoch": 0}
    head_stage = len(stage_names(model, arch)) - 1
    if cfg.head_epochs > 0 and head_stage > k:
        _run_stage("head", model, suffix, arch, head_stage, cfg.lr_head, cfg.head_epochs,
                   train_x, train_y, val_x, val_y, cfg, device, history, best, train_w, meta)
    if cfg.epochs > 0:
        _run_stage("unfrozen", model, suffix, arch, k,
                   cfg.lr_body if head_stage > k else cfg.lr_head, cfg.epochs,
                   train_x, train_y, val_x, val_y, cfg, device, history, best, train_w, meta)
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
    meta = ModelMeta(architecture=arch, input_size=size, preprocessing=prep, classes=classes)
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
    val_p, val_pneu = _predict_findings(suffix, val_x[:, 0], device, meta)
    if val_y.any():
        threshold = threshold_for_sensitivity(val_y, val_p, cfg.target_sensitivity)
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
                                                            cfg.target_sensitivity)
        else:
            pneumonia_threshold = 0.5
            log.warning("validation split has no known pneumonia; its threshold left at 0.5")
        if len(set(known[keep].tolist())) == 2:
            pm = evaluate_scores(known[keep], val_pneu[keep], pneumonia_threshold)
            val_metrics["pneumonia_auc"] = pm["auc"]
            val_metrics["pneumonia_sensitivity"] = pm["sensitivity"]
            val_metrics["pneumonia_specificity"] = pm["specificity"]
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
                       val_scores=val_p, timings=timings)


__all__ = [
    "TrainConfig",
    "allowed_classes",
    "category",
    "masked_loss",
    "pneumonia_truth",
    "TrainResult",
    "TrainingError",
    "extract",
    "feature_cache",
    "fit_on_features",
    "load_squares",
    "sample_weights",
    "train_model",
]
