"""Training learns a synthetic class signal; cached features reproduce the full network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.trainer_synthetic import write_folder
from trainer.architectures import build_model
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.datasets import folder_records
from trainer.evaluate import predict_records
from trainer.features import split_model
from trainer.metrics import confusion
from trainer.splits import Split, split_records
from trainer.train import TrainConfig, train_model


def test_prefix_and_suffix_compose_to_the_whole_network() -> None:
    model = build_model("efficientnet_lite0", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        for k in (0, 1, 9, 16, 17, 18):
            prefix, suffix = split_model(model, "efficientnet_lite0", k)
            assert torch.allclose(suffix(prefix(x)), ref, atol=1e-4)


@pytest.mark.slow
def test_training_learns_and_threshold_meets_target_on_validation(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", n_patients=60, signal=1.0)
    parts = split_records(folder_records(root), "k", (0.6, 0.2, 0.2))
    cfg = TrainConfig(input_size=64, contrast="clahe", views=2, head_epochs=3, epochs=3,
                      device="cpu", target_sensitivity=0.9)
    result = train_model(parts[Split.TRAIN], parts[Split.VALIDATION], cfg,
                         cache_root=tmp_path / "cache")
    assert result.val_metrics["auc"] > 0.9
    y = np.array([r.label for r in parts[Split.VALIDATION]])
    c = confusion(y, result.val_scores, result.meta.threshold)
    assert c.tp / (c.tp + c.fn) >= 0.9
    assert result.meta.provenance.data_digest and result.history
    assert {"epoch", "val_auc", "train_loss"} <= set(result.history[0])
    # saved and re-loaded, the whole network on held-out test patients scores as well
    path = tmp_path / "m.pt"
    save_checkpoint(path, result.model, result.meta)
    loaded = load_checkpoint(path)
    test = parts[Split.TEST]
    p = predict_records(loaded.model, loaded.meta, test)
    from trainer.metrics import roc_auc

    assert roc_auc([r.label for r in test], p) > 0.85  # type: ignore[operator]
    # the same seed and cached features give the same model
    again = train_model(parts[Split.TRAIN], parts[Split.VALIDATION], cfg,
                        cache_root=tmp_path / "cache")
    assert np.allclose(again.val_scores, result.val_scores, atol=1e-6)
