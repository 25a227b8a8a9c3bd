"""Evaluate a model on labelled images: ``python -m trainer.evaluate --dataset DIR``.

Only patients never seen in training count: by default the test split of the patient-wise
keyed split (``settings.split_key``), which no model trained here ever trains or validates
on.  ``--patients all`` uses every patient, and is refused for a folder the model was
trained on.  Scores come from the one scorer (:class:`trainer.scoring.Scorer`): the full
network on the pixel pipeline, at the model file's precision, as in production.

COVID-19 vs rest gives ``auc``, ``auc_ci``, ``threshold``, ``sensitivity``,
``specificity`` and ``per_source.<src>.auc`` as for every model.  A three-class model on
a folder whose ``labels.csv`` has ``label_name`` adds the pneumonia-pattern finding
(``pneumonia_auc``, ``pneumonia_auc_ci``, its threshold, sensitivity and specificity, and
``per_source.<src>.pneumonia_auc`` where a source has both normal and pneumonia images),
one-vs-rest AUCs per class (``class_auc``) and a 3x3 confusion matrix (``confusion_3x3``:
rows the true class, columns the call at the model's thresholds: COVID-19 where
P(COVID-19) reaches its threshold, else other pneumonia where the pneumonia pattern
reaches its own, else normal).  A folder without ``label_name`` is evaluated as before.

Exit codes: 0 done, 1 failure, 2 usage (bad arguments, unknown model, unusable dataset).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from db.logs import configure_logging
from db.session import Database
from db.settings import Settings, SettingsError, load_settings
from trainer.checkpoint import (
    THREE_CLASSES,
    CheckpointError,
    LoadedModel,
    ModelMeta,
    load_checkpoint,
)
from trainer.datasets import DatasetError, ImageRecord, describe, folder_records
from trainer.metrics import delong_ci, evaluate_scores, operating_point, roc_auc
from trainer.progress import progress
from trainer.registry import RegistryError, get_model, production_model
from trainer.scoring import Scorer
from trainer.splits import Split, split_records

log = logging.getLogger(__name__)


def predict_records(model: nn.Module, meta: ModelMeta, records: Sequence[ImageRecord],
                    device: torch.device | str = "cpu", desc: str = "scoring") -> np.ndarray:
    """COVID-19 probabilities for ``records`` from the whole network (as the worker)."""
    return predict_findings_records(model, meta, records, device, desc)[0]


def predict_findings_records(
    model: nn.Module, meta: ModelMeta, records: Sequence[ImageRecord],
    device: torch.device | str = "cpu", desc: str = "scoring",
) -> tuple[np.ndarray, np.ndarray | None]:
    """(P(COVID-19), P(pneumonia pattern) or None for a two-class model) per record,
    through the one scorer: the numbers the worker gives the same images."""
    scorer = Scorer(LoadedModel(model=model, meta=meta, sha256=""), device)
    with progress(len(records), desc, unit="img") as bar:
        return scorer.predict_findings_files([r.path for r in records], progress=bar.update)


def three_class_metrics(names: Sequence[str | None], covid: np.ndarray, pneu: np.ndarray,
                        threshold: float, pneumonia_threshold: float,
                        groups: Sequence[str]) -> dict[str, Any]:
    """The pneumonia-pattern finding, one-vs-rest AUCs and the 3x3 confusion matrix, on
    the images whose class is known (``names``: a class name, or None for a bare 0/1)."""
    known = np.array([n is not None for n in names])
    truth = np.array([THREE_CLASSES.index(n) if n is not None else -1 for n in names])
    t, c, p = truth[known], covid[known], pneu[known]
    g = np.array(list(groups), dtype=object)[known]
    out: dict[str, Any] = {"n_with_class": int(known.sum())}
    y_pneu = (t > 0).astype(np.int64)
    auc, ci = delong_ci(y_pneu, p)
    out["pneumonia_auc"], out["pneumonia_auc_ci"] = auc, ci
    out["pneumonia_threshold"] = pneumonia_threshold
    point = operating_point(y_pneu, p, pneumonia_threshold)
    out["pneumonia_sensitivity"] = point["sensitivity"]
    out["pneumonia_specificity"] = point["specificity"]
    class_scores = {"normal": 1.0 - p, "other_pneumonia": p - c, "covid": c}
    out["class_auc"] = {name: roc_auc((t == i).astype(np.int64), class_scores[name])
                        for i, name in enumerate(THREE_CLASSES)}
    called = np.where(c >= threshold, 2, np.where(p >= pneumonia_threshold, 1, 0))
    matrix = [[int(((t == i) & (called == j)).sum()) for j in range(3)] for i in range(3)]
    out["confusion_3x3"] = {"classes": list(THREE_CLASSES), "rows": "true class",
                            "columns": "call at the thresholds", "matrix": matrix}
    per: dict[str, dict[str, Any]] = {}
    for src in sorted({str(x) for x in g}):
        m = g == src
        a, aci = delong_ci(y_pneu[m], p[m])
        if a is not None:
            per[src] = {"pneumonia_auc": a, "pneumonia_auc_ci": aci}
        pn = m & (t > 0)
        b, bci = delong_ci((t[pn] == 2).astype(np.int64), c[pn])
        if b is not None:
            per.setdefault(src, {}).update(covid_vs_other_pneumonia_auc=b,
                                           covid_vs_other_pneumonia_auc_ci=bci)
    out["per_source"] = per
    return out


def evaluate_records(model: nn.Module, meta: ModelMeta, records: Sequence[ImageRecord],
                     *, target_sensitivity: float | None = None,
                     device: torch.device | str = "cpu") -> tuple[dict[str, Any], np.ndarray]:
    """Every figure (overall and per source) at the model's own threshold, and the scores."""
    scores, pneu = predict_findings_records(model, meta, records, device)
    y = np.array([r.label for r in records], dtype=np.int64)
    groups = [r.source for r in records]
    result = evaluate_scores(y, scores, meta.threshold, groups=groups,
                             target_sensitivity=target_sensitivity)
    result["patients"] = len({r.patient_key for r in records})
    result["classes"] = list(meta.classes)
    names = [r.label_name for r in records]
    if pneu is not None and any(n is not None for n in names):
        extra = three_class_metrics(names, scores, pneu, meta.threshold,
                                    meta.pneumonia_threshold
                                    if meta.pneumonia_threshold is not None else 0.5, groups)
        for src, figures in extra.pop("per_source").items():
            result["per_source"].setdefault(src, {}).update(figures)
        result.update(extra)
    return result, scores


@dataclass
class ResolvedModel:
    loaded: LoadedModel
    version: str | None
    path: Path


def resolve_model(spec: str | None, settings: Settings) -> ResolvedModel:
    """A model by registered version, by file path, or the production model (None)."""
    if spec and Path(spec).is_file():
        return ResolvedModel(load_checkpoint(Path(spec), device="cpu"), None, Path(spec))
    db = Database(settings)
    try:
        info = get_model(db, spec) if spec else production_model(db)
    finally:
        db.dispose()
    if info is None:
        raise RegistryError("no production model; pass --model VERSION or PATH")
    loaded = load_checkpoint(Path(info.path), expected_sha256=info.sha256, device="cpu")
    return ResolvedModel(loaded, info.version, Path(info.path))


def select_patients(records: Sequence[ImageRecord], settings: Settings,
                    patients: str) -> list[ImageRecord]:
    if patients == "all":
        return list(records)
    return split_records(records, settings.split_key, settings.split_fractions)[Split(patients)]


def _trained_on(meta: ModelMeta) -> set[str]:
    extra = meta.provenance.extra or {}
    return {str(d) for d in extra.get("datasets", [])}


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    resolved = resolve_model(args.model, settings)
    records = folder_records(Path(args.dataset))
    if args.patients == "all" and Path(args.dataset).resolve().name in {
        Path(d).name for d in _trained_on(resolved.loaded.meta)
    }:
        raise DatasetError(
            f"the model was trained on {args.dataset}; evaluate its test split instead "
            "(--patients test)"
        )
    chosen = select_patients(records, settings, args.patients)
    if not chosen:
        raise DatasetError(f"no images of {args.patients} patients in {args.dataset}")
    result, _ = evaluate_records(resolved.loaded.model, resolved.loaded.meta, chosen,
                                 target_sensitivity=settings.target_sensitivity)
    result["model"] = resolved.version or str(resolved.path)
    result["dataset"] = str(args.dataset)
    result["patients_used"] = (
        f"{args.patients} split of the keyed patient split ({result['patients']} patients)"
        if args.patients != "all" else f"all {result['patients']} patients"
    )
    result["data"] = describe(chosen)
    return result


def format_text(r: dict[str, Any]) -> str:
    def ci(v: Any, c: Any) -> str:
        if v is None:
            return "n/a"
        return f"{v:.3f}" + (f" [{c[0]:.3f}, {c[1]:.3f}]" if c else "")

    lines = [
        f"model {r['model']} on {r['dataset']}: {r['patients_used']}, {r['n']} images "
        f"({r['n_positive']} positive)",
        f"ROC AUC {ci(r['auc'], r['auc_ci'])}  PR AUC "
        f"{'n/a' if r['pr_auc'] is None else format(r['pr_auc'], '.3f')}  "
        f"Brier {r['brier']:.3f}",
        f"threshold {r['threshold']:.4f}: sensitivity {ci(r['sensitivity'], r['sensitivity_ci'])}"
        f"  specificity {ci(r['specificity'], r['specificity_ci'])}",
        f"  PPV {ci(r['ppv'], r['ppv_ci'])}  NPV {ci(r['npv'], r['npv_ci'])}  "
        f"F1 {ci(r['f1'], r['f1_ci'])}  accuracy {ci(r['accuracy'], r['accuracy_ci'])}",
        f"  confusion {r['confusion']}",
        "per source:",
    ]
    for name, s in r["per_source"].items():
        lines.append(
            f"  {name:12s} n={s['n']:4d} pos={s['n_positive']:4d} AUC {ci(s['auc'], s['auc_ci'])}"
            f"  sens {ci(s['sensitivity'], s['sensitivity_ci'])}"
            f"  spec {ci(s['specificity'], s['specificity_ci'])}"
            + (f"  pneumonia AUC {ci(s['pneumonia_auc'], s['pneumonia_auc_ci'])}"
               if "pneumonia_auc" in s else "")
            + (f"  COVID vs other pneumonia AUC {ci(s['covid_vs_other_pneumonia_auc'], s['covid_vs_other_pneumonia_auc_ci'])}"  # noqa: E501
               if "covid_vs_other_pneumonia_auc" in s else "")
        )
    if "pneumonia_auc" in r:
        lines.append(
            f"pneumonia pattern (P(covid) + P(other pneumonia)) AUC "
            f"{ci(r['pneumonia_auc'], r['pneumonia_auc_ci'])}  threshold "
            f"{r['pneumonia_threshold']:.4f}: sensitivity {ci(r['pneumonia_sensitivity'], None)}"
            f"  specificity {ci(r['pneumonia_specificity'], None)}")
        lines.append("one-vs-rest AUC: " + "  ".join(
            f"{k} {ci(v, None)}" for k, v in r["class_auc"].items()))
        lines.append("confusion (rows true normal / other pneumonia / covid, columns call): "
                     + str(r["confusion_3x3"]["matrix"]))
    lines.append("threshold  sensitivity  specificity")
    for row in r["threshold_table"]:
        sens = "n/a" if row["sensitivity"] is None else f"{row['sensitivity']:.3f}"
        spec = "n/a" if row["specificity"] is None else f"{row['specificity']:.3f}"
        lines.append(f"  {row['threshold']:.1f}      {sens:>8s}     {spec:>8s}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="folder with labels.csv")
    p.add_argument("--model", help="registered version or checkpoint path (default: production)")
    p.add_argument("--patients", choices=["test", "validation", "all"], default="test",
                   help="which patients of the keyed split to use (default: test)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    configure_logging(logging.WARNING, "%(levelname)s %(name)s %(message)s")
    try:
        settings = load_settings()
        result = run(args, settings)
    except (SettingsError, DatasetError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else format_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
