"""Synthetic labelled chest-like images for trainer tests: tiny, fast, with a class signal.

Positives carry bright patchy opacities in the lower "lung" fields (a crude stand-in for
COVID-19's peripheral ground-glass), negatives do not.  ``signal`` scales how visible it is.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def chest_like(rng: np.random.Generator, positive: bool, size: int = 64,
               signal: float = 1.0) -> np.ndarray:
    """A uint8 image: two dark lung fields, noise, and opacities when positive."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.75 - 0.35 * (np.exp(-(((xx - 0.3) / 0.13) ** 2 + ((yy - 0.5) / 0.3) ** 2))
                         + np.exp(-(((xx - 0.7) / 0.13) ** 2 + ((yy - 0.5) / 0.3) ** 2)))
    img = img + rng.normal(0, 0.04, img.shape)
    if positive:
        for _ in range(3):
            cx = rng.choice([0.28, 0.72]) + rng.normal(0, 0.04)
            cy = 0.62 + rng.normal(0, 0.08)
            img = img + signal * 0.35 * np.exp(-(((xx - cx) / 0.07) ** 2 + ((yy - cy) / 0.07) ** 2))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def pneumonia_like(rng: np.random.Generator, size: int = 64, signal: float = 1.0) -> np.ndarray:
    """Other pneumonia: one dense lobar consolidation high in one lung field."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = chest_like(rng, False, size, signal).astype(np.float64) / 255.0
    cx = rng.choice([0.3, 0.7]) + rng.normal(0, 0.03)
    cy = 0.35 + rng.normal(0, 0.04)
    img = img + signal * 0.45 * np.exp(-(((xx - cx) / 0.12) ** 2 + ((yy - cy) / 0.1) ** 2))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_folder(root: Path, n_patients: int = 60, images_per_patient: int = 2,
                 seed: int = 0, signal: float = 1.0, source: str = "synthetic",
                 shuffle_labels: bool = False, size: int = 64,
                 three_class: bool = False) -> Path:
    """A dataset folder with ``labels.csv`` (path,label,patient_id,source) and PNG files.

    ``three_class`` cycles patients through normal / other pneumonia / covid and adds the
    ``label_name`` column."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    names = ("normal", "other_pneumonia", "covid")
    for p in range(n_patients):
        label = int(p % 2 == 0)
        name3 = names[p % 3]
        if three_class:
            label = int(name3 == "covid")
        for i in range(images_per_patient):
            name = f"images/{source}-p{p}-{i}.png"
            if three_class and name3 == "other_pneumonia":
                pixels = pneumonia_like(rng, size, signal)
            else:
                pixels = chest_like(rng, bool(label), size, signal)
            Image.fromarray(pixels).save(root / name)
            row = {"path": name, "label": label, "patient_id": f"{source}:{p}",
                   "source": source}
            if three_class:
                row["label_name"] = name3
            rows.append(row)
    if shuffle_labels:
        labels = [r["label"] for r in rows]
        rng.shuffle(labels)
        for r, lab in zip(rows, labels, strict=True):
            r["label"] = lab
    with (root / "labels.csv").open("w", newline="") as fh:
        fields = ["path", "label", "patient_id", "source"] + (["label_name"] if three_class else [])
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return root
