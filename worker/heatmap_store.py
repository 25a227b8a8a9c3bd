"""Heatmaps on disk: one ``.npy`` per scored image under ``settings.heatmaps_dir``.

The trainer computes maps (:mod:`trainer.heatmaps`, maths only); the worker stores them
here, beside the Prediction row that names the file, and the operator's web page reads
them back.  Maps are kept as float16 in [0, 1] and written atomically, so a reader never
sees half a file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from db import paths
from db.atomic import write_atomically
from db.settings import Settings


def write_heatmap(heatmap: np.ndarray, path: Path) -> Path:
    """Save a [0, 1] map as ``.npy`` float16, atomically (temp + fsync + rename)."""
    values = np.clip(np.asarray(heatmap, dtype=np.float32), 0, 1).astype(np.float16)
    return write_atomically(Path(path), lambda fh: np.save(fh, values))


def heatmap_path(settings: Settings, study_uid: str, sop_instance_uid: str) -> Path:
    """Where a study image's heatmap lives under ``settings.heatmaps_dir``: UIDs become
    names only through the safe-path helper, so a hostile UID never leaves the folder."""
    return paths.under(settings.heatmaps_dir, paths.uid_name(study_uid),
                       f"{paths.uid_name(sop_instance_uid)}.npy")


def save_heatmap(
    heatmap: np.ndarray, settings: Settings, study_uid: str, sop_instance_uid: str
) -> Path:
    """Write a heatmap under ``settings.heatmaps_dir`` and return its path."""
    return write_heatmap(heatmap, heatmap_path(settings, study_uid, sop_instance_uid))


def read_heatmap(path: Path) -> np.ndarray:
    """A saved heatmap as float32."""
    return np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)


__all__ = ["heatmap_path", "read_heatmap", "save_heatmap", "write_heatmap"]
