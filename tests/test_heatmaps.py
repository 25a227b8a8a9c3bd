"""Grad-CAM and occlusion sensitivity, drawn by the scorer, find the region that carries
the class signal."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from db.settings import Settings
from tests.support.model_synthetic import (
    SIGNAL_CENTRE,
    SIGNAL_RADIUS,
    SIZE,
    synthetic_image,
    train_tiny_model,
)
from trainer.checkpoint import LoadedModel
from trainer.scoring import Scorer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def trained() -> LoadedModel:
    return train_tiny_model()


def positive(source: int) -> np.ndarray:
    return synthetic_image(True, np.random.default_rng(11), source)


def peak_near_signal(heatmap: np.ndarray, source: int) -> None:
    f = source / SIZE
    cy, cx = SIGNAL_CENTRE[0] * f, SIGNAL_CENTRE[1] * f
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    assert np.hypot(y - cy, x - cx) <= 3 * SIGNAL_RADIUS * f, (y, x, cy, cx)
    yy, xx = np.mgrid[0 : heatmap.shape[0], 0 : heatmap.shape[1]]
    inside = np.hypot(yy - cy, xx - cx) <= SIGNAL_RADIUS * f
    far = np.hypot(yy - cy, xx - cx) > 4 * SIGNAL_RADIUS * f
    assert heatmap[inside].mean() > 2 * heatmap[far].mean()


def gradcam(loaded: LoadedModel, img: np.ndarray, device: str = "cpu") -> np.ndarray:
    return Scorer(loaded, device).findings_and_gradcam([img])[0][0]


METHODS: dict[str, Callable[..., np.ndarray]] = {
    "gradcam": gradcam,
    "occlusion": lambda loaded, img, dev: Scorer(loaded, dev).occlusion(img, size=16, stride=8,
                                                                        batch=32),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_heatmap_peaks_on_signal_at_source_resolution(trained: LoadedModel, method: str,
                                                      device: str) -> None:
    img = positive(128)
    out = METHODS[method](trained, img, device)
    assert out.dtype == np.float32 and out.shape == img.shape
    assert float(out.min()) >= 0.0 and float(out.max()) > 0.9
    peak_near_signal(out, 128)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_non_square_source_maps_back_through_letterbox(trained: LoadedModel, method: str) -> None:
    img = np.concatenate([positive(128), np.full((32, 128), 0.35, np.float32)])  # 160 x 128
    out = METHODS[method](trained, img, "cpu")
    assert out.shape == (160, 128)
    peak_near_signal(out[:128], 128)


def test_occlusion_batching_does_not_change_the_map(trained: LoadedModel) -> None:
    img = positive(64)
    scorer = Scorer(trained, "cpu")
    one = scorer.occlusion(img, size=16, stride=8, batch=1)
    many = scorer.occlusion(img, size=16, stride=8, batch=64)
    np.testing.assert_allclose(one, many, atol=1e-4)


def test_gradcam_batch_matches_single(trained: LoadedModel) -> None:
    a, b = positive(64), synthetic_image(True, np.random.default_rng(3), 96)
    maps = Scorer(trained, "cpu").findings_and_gradcam([a, b])[0]
    assert [m.shape for m in maps] == [(64, 64), (96, 96)]
    np.testing.assert_array_equal(maps[0], gradcam(trained, a))


def test_gradcam_probabilities_are_the_scorers(trained: LoadedModel) -> None:
    """The worker takes its probabilities from the Grad-CAM pass: they are the scorer's,
    bit for bit."""
    imgs = [positive(64), synthetic_image(False, np.random.default_rng(5), 64)]
    scorer = Scorer(trained, "cpu")
    maps, probs, pneu = scorer.findings_and_gradcam(imgs)
    np.testing.assert_array_equal(probs, scorer.predict(imgs))
    assert pneu is None and probs.dtype == np.float64
    assert probs[0] > 0.5 > probs[1]
    np.testing.assert_array_equal(maps[0], gradcam(trained, imgs[0]))


def test_compute_follows_settings(trained: LoadedModel, make_settings) -> None:  # type: ignore[no-untyped-def]
    img = positive(64)
    s: Settings = make_settings(heatmap_method="occlusion", occlusion_size=16,
                                occlusion_stride=16, occlusion_batch=8)
    scorer = Scorer(trained, "cpu")
    occ = scorer.heatmap(img, s)
    np.testing.assert_allclose(occ, scorer.occlusion(img, 16, 16, 8), atol=1e-5)
    cam = scorer.heatmap(img, s.replace(heatmap_method="gradcam"))
    np.testing.assert_allclose(cam, gradcam(trained, img), atol=1e-5)


def test_bad_occlusion_parameters(trained: LoadedModel) -> None:
    with pytest.raises(ValueError):
        Scorer(trained, "cpu").occlusion(positive(64), size=0)
