"""What a label asks of the network: loss targets, the masked loss, per-image weights, and
the pneumonia-pattern truth used to choose that finding's threshold.

A study known only as "not COVID-19" (a 0/1 label without a ``label_name``) is a partial
label: its loss is -log(P(normal) + P(other pneumonia)), so it trains the COVID-19
objective and says nothing about pneumonia (the masked loss).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from trainer.checkpoint import TWO_CLASSES
from trainer.datasets import ImageRecord


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


__all__ = ["allowed_classes", "category", "masked_loss", "pneumonia_truth", "sample_weights"]
