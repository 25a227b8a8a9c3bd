"""Model preprocessing on decoded images: the letterbox and its way back, and contrast
normalisation that touches the image but never the padding."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.transforms import apply_contrast, letterbox, prepare_image


def test_letterbox_round_trip() -> None:
    img = np.zeros((100, 50), dtype=np.float32)
    img[10:30, 5:15] = 1.0
    square, box = letterbox(img, 64)
    assert square.shape == (64, 64)
    assert (box.height, box.width, box.top, box.left) == (64, 32, 0, 16)
    assert square[:, :16].max() == 0.0 and square[:, 48:].max() == 0.0  # padding
    back = box.to_source(square)
    assert back.shape == (100, 50)
    assert back[20, 10] > 0.9 and back[80, 40] < 0.05
    wide, wbox = letterbox(np.ones((30, 90), dtype=np.float32), 60)
    assert (wbox.top, wbox.height, wbox.width) == (20, 20, 60)
    assert wide[:20].max() == 0.0 and wide[20:40].min() > 0.99


def test_contrast_methods_change_only_the_image() -> None:
    rng = np.random.default_rng(0)
    img = (0.4 + 0.1 * rng.random((80, 40))).astype(np.float32)  # low contrast
    for method in ("clahe", "equalize"):
        square, box = prepare_image(img, 64, contrast=method)
        inner = square[box.top : box.top + box.height, box.left : box.left + box.width]
        assert float(inner.std()) > float(img.std()) * 2
        assert square[:, : box.left].max() == 0.0
    assert apply_contrast(img, "none") is img
    with pytest.raises(ValueError):
        apply_contrast(img, "sharpen")
