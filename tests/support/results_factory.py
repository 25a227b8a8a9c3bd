"""Inputs and checks for the result builders' tests: models, scored images, dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.results import AnalysisResult, OutputModel, PredecessorRef, ScoredImage


def make_model(version: str = "2024.05.1", sha256: str | None = None,
               threshold: float = 0.42) -> OutputModel:
    return OutputModel(
        name="cxr-covid-test",
        version=version,
        sha256=sha256 or (version.encode().hex() * 64)[:64],
        architecture="efficientnet_lite0",
        threshold=threshold,
        heatmap_method="gradcam",
        manufacturer="cxr-triage",
    )


def pixels01(ds: Dataset) -> np.ndarray:
    """Source pixels scaled to [0, 1] by the stored bit depth (enough for phantoms)."""
    arr = ds.pixel_array.astype(np.float32)
    return arr / float(2 ** int(ds.BitsStored) - 1)


def blob_heatmap(shape: tuple[int, int], cx: float = 0.33, cy: float = 0.5) -> np.ndarray:
    """A smooth hot spot, like a Grad-CAM map, in [0, 1]."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-(((xx - cx * w) / (w / 7)) ** 2 + ((yy - cy * h) / (h / 5)) ** 2))
    return blob.astype(np.float32)


def scored(ds: Dataset, probability: float, with_heatmap: bool = True) -> ScoredImage:
    img = pixels01(ds)
    return ScoredImage(
        source=ds,
        probability=probability,
        heatmap=blob_heatmap(img.shape) if with_heatmap else None,
        image01=img,
    )


def make_result(sources: list[Dataset], probabilities: list[float] | None = None,
                model: OutputModel | None = None,
                predecessor: PredecessorRef | None = None) -> AnalysisResult:
    model = model or make_model()
    probabilities = probabilities or [0.8] * len(sources)
    study_probability = max(probabilities)
    return AnalysisResult(
        study_probability=study_probability,
        positive=study_probability >= model.threshold,
        scored=[scored(ds, p) for ds, p in zip(sources, probabilities, strict=True)],
        model=model,
        predecessor=predecessor,
    )


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) reported by dicom3tools' dciodvfy for one file."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, warnings


# Warnings that real sources bring with them and that we accept: empty Type 2 study
# attributes (DICOMDIR hints), single-component person names of anonymised data, and an
# empty Laterality where the source names no body part (it is then truly unknown).
ACCEPTED_WARNING_MARKERS = (
    "needed to build DICOMDIR",
    "Retired Person Name form",
    "only permitted to be empty when actually unknown",
)


def unexpected_warnings(warnings: list[str]) -> list[str]:
    return [w for w in warnings if not any(m in w for m in ACCEPTED_WARNING_MARKERS)]


def chest_sources(shared_dicom: Path) -> list[Path]:
    """The shared real chest radiographs (not the abdominal sample)."""
    return sorted(p for p in shared_dicom.glob("*.dcm") if "nonchest" not in p.name)
