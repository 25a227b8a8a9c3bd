"""Staged fine-tuning of the stages after the cutoff, on cached features.

The frozen prefix's outputs are cached (:mod:`trainer.features`), so each epoch only runs
the trainable suffix: first the head alone at a higher learning rate, then every stage
after the cutoff at a lower one.  On CUDA the steps run under float16 autocast with a
GradScaler.

Early stopping keeps the epoch with the best validation COVID-19 AUC (ties broken by the
validation loss), scored here on the cached validation features.  Those scores choose an
epoch and nothing else: the thresholds and validation figures come from the one scorer on
the whole network (:func:`trainer.train.train_model`).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.architectures import freeze_until, stage_names, train_mode
from trainer.checkpoint import ModelMeta, Preprocessing, findings
from trainer.metrics import roc_auc
from trainer.progress import track
from trainer.targets import masked_loss
from trainer.train_config import TrainConfig

log = logging.getLogger(__name__)


#: The head a ``meta`` of None stands for: one COVID-19 logit (the two-class models).
_SINGLE_LOGIT = ModelMeta("tiny_cnn", 1, Preprocessing())


def feature_scores(suffix: nn.Module, feats: torch.Tensor, device: torch.device,
                   meta: ModelMeta | None = None, batch: int = 128) -> np.ndarray:
    """P(COVID-19) from cached features, for model selection only (early stopping, and
    out-of-fold figures in ``benchmarks/training.py``); single-logit head unless ``meta``
    says otherwise."""
    meta = meta or _SINGLE_LOGIT
    suffix.eval()
    covid = []
    with torch.inference_mode(), _autocast(device):
        for s in range(0, feats.shape[0], batch):
            covid.append(findings(suffix(feats[s:s + batch].to(device)).float().cpu(), meta)[0])
    if not covid:
        return np.zeros(0)
    return torch.cat(covid).numpy().astype(np.float64)


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
    meta = meta or _SINGLE_LOGIT
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
        val_p = feature_scores(suffix, val_x[:, 0], device, meta)
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


__all__ = ["feature_scores", "fit_on_features"]
