"""Heatmap files: float16 ``.npy`` under the heatmaps folder, written atomically, read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from db.settings import Settings
from worker.heatmap_store import read_heatmap, save_heatmap, write_heatmap


def test_save_heatmap_under_the_heatmaps_dir_and_read_it_back(make_settings) -> None:  # type: ignore[no-untyped-def]
    s: Settings = make_settings()
    yy, xx = np.mgrid[0:64, 0:48]
    heat = np.exp(-((yy - 20.0) ** 2 + (xx - 30.0) ** 2) / 200.0).astype(np.float32)
    path = save_heatmap(heat, s, "1.2.3", "1.2.3.4")
    assert path == s.heatmaps_dir / "1.2.3" / "1.2.3.4.npy" and path.is_file()
    stored = np.load(path)
    assert stored.dtype == np.float16 and stored.shape == heat.shape
    np.testing.assert_allclose(read_heatmap(path), heat, atol=1e-3)
    assert read_heatmap(path).dtype == np.float32
    assert [p.name for p in path.parent.iterdir()] == ["1.2.3.4.npy"]


def test_write_heatmap_to_any_path(tmp_path: Path) -> None:
    path = write_heatmap(np.linspace(0, 1, 12).reshape(3, 4), tmp_path / "a" / "h.npy")
    assert np.load(path).shape == (3, 4)
