"""Trainer benchmarks and experiments on the shared chest X-rays (../shared/data/cxr).

    python benchmarks/training.py cv --size 320 --contrast clahe --cutoff block15
        patient-wise K-fold cross-validation (folds from the keyed patient hash) on cached
        features: out-of-fold ROC AUC overall and per source, with DeLong 95% CIs.  Used
        to choose the trainer's defaults; every image is scored by a model that never saw
        its patient, which gives far tighter within-source intervals than one test split.
    python benchmarks/training.py bootstrap
        ``python -m trainer.retrain --dataset ../shared/data/cxr`` in a fresh data dir:
        wall time, validation and test figures per source.
    python benchmarks/training.py nightly [--images 1000] [--cold]
        a second, forced nightly run on the same data dir (champion exists, features of
        earlier nights cached), and with ``--cold`` one with an empty feature cache.

Results are printed as JSON lines (and appended to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db.settings import load_settings  # noqa: E402
from trainer.architectures import build_model, freeze_until  # noqa: E402
from trainer.checkpoint import ModelMeta, Preprocessing  # noqa: E402
from trainer.datasets import folder_records  # noqa: E402
from trainer.features import cutoff_index, split_model  # noqa: E402
from trainer.fit import feature_scores, fit_on_features  # noqa: E402
from trainer.metrics import evaluate_scores  # noqa: E402
from trainer.splits import patient_fraction  # noqa: E402
from trainer.targets import sample_weights  # noqa: E402
from trainer.train import TrainConfig, extract, feature_cache, seed_everything  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "cxr"


def _brief(ev: dict[str, Any]) -> dict[str, Any]:
    def r(v: Any) -> Any:
        return None if v is None else (round(v, 4) if isinstance(v, float) else
                                       [round(x, 4) for x in v])

    out = {"auc": r(ev["auc"]), "auc_ci": r(ev["auc_ci"]), "n": ev["n"]}
    out["per_source"] = {k: {"auc": r(v["auc"]), "auc_ci": r(v["auc_ci"]), "n": v["n"],
                             "pos": v["n_positive"]}
                         for k, v in ev.get("per_source", {}).items()}
    return out


def cmd_cv(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings(env={})
    records = folder_records(Path(args.dataset))
    if args.limit:
        records = records[: args.limit]
    cfg = TrainConfig(input_size=args.size, contrast=args.contrast, cutoff=args.cutoff,
                      views=args.views, head_epochs=args.head_epochs, epochs=args.epochs,
                      device="cpu", lr_body=args.lr_body, lr_head=args.lr_head,
                      balance=args.balance)
    seed_everything(cfg.seed)
    arch = cfg.architecture
    model = build_model(arch, pretrained=True)
    k = cutoff_index(model, arch, cfg.cutoff)
    freeze_until(model, arch, k)
    prefix, suffix = split_model(model, arch, k)
    meta = ModelMeta(arch, cfg.input_size, Preprocessing.for_backbone(arch, cfg.contrast))
    cache = feature_cache(model, arch, k, meta, cfg, Path(args.cache))
    t0 = time.perf_counter()
    feats = extract(prefix, records, meta, cfg.views, cache, torch.device("cpu"), cfg,
                    "features")
    t_feat = time.perf_counter() - t0
    y = np.array([r.label for r in records])
    folds = np.array([int(patient_fraction(r.patient_key, settings.split_key) * args.folds)
                      for r in records])
    init = copy.deepcopy(model.state_dict())
    oof = np.zeros(len(records))
    t1 = time.perf_counter()
    for f in range(args.folds):
        te, va = folds == f, folds == (f + 1) % args.folds
        tr = ~(te | va)
        model.load_state_dict(init)
        weights = sample_weights([records[i] for i in np.flatnonzero(tr)], cfg.balance)
        fit_on_features(model, arch, k, suffix, feats[tr],
                        torch.tensor(y[tr], dtype=torch.float32), feats[va][:, :1], y[va],
                        cfg, torch.device("cpu"), weights)
        oof[te] = feature_scores(suffix, feats[te][:, 0], torch.device("cpu"))
    ev = evaluate_scores(y, oof, 0.5, groups=[r.source for r in records])
    return {"cmd": "cv", "size": cfg.input_size, "contrast": cfg.contrast, "cutoff": cfg.cutoff,
            "views": cfg.views, "head_epochs": cfg.head_epochs, "epochs": cfg.epochs,
            "lr_body": cfg.lr_body, "balance": cfg.balance, "folds": args.folds,
            "features_s": round(t_feat, 1),
            "train_s": round(time.perf_counter() - t1, 1), **_brief(ev)}


def _retrain(data_dir: Path, dataset: Path, force: bool) -> dict[str, Any]:
    from sqlalchemy import select

    from db.models import Evaluation
    from db.session import Database
    from trainer.retrain import run_nightly

    settings = load_settings(env={}, overrides={"data_dir": data_dir})
    t0 = time.perf_counter()
    out = run_nightly(settings, [dataset], force=force)
    wall = time.perf_counter() - t0
    db = Database(settings)
    with db.session() as s:
        evs = s.scalars(select(Evaluation).where(Evaluation.run_id == out.run_id)).all()
        figures = {e.kind + ":" + str(e.model_version_id): _brief(e.metrics_json) for e in evs}
        val = None
        from db.models import ModelVersion

        mv = s.scalar(select(ModelVersion).where(ModelVersion.version == out.challenger))
        if mv is not None:
            val = _brief(mv.metadata_json.get("validation") or {"auc": None, "auc_ci": None,
                                                                "n": 0})
    db.dispose()
    return {"wall_s": round(wall, 1), "decision": out.decision, "status": out.status,
            "challenger": out.challenger, "report": str(out.report), "validation": val,
            "test": figures, "reasons": out.reasons}


def cmd_bootstrap(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(args.data_dir)
    if data_dir.exists():
        shutil.rmtree(data_dir)
    return {"cmd": "bootstrap", **_retrain(data_dir, Path(args.dataset), force=False)}


def cmd_nightly(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(args.data_dir)
    dataset = Path(args.dataset)
    if args.images:
        # a folder view of the first N images (labels.csv with absolute paths; no copies)
        import csv

        tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
        with (dataset / "labels.csv").open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))[: args.images]
        for r in rows:
            r["path"] = str((dataset / r["path"]).resolve())
        with (tmp / "labels.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        dataset = tmp
    out: dict[str, Any] = {"cmd": "nightly", "images": args.images}
    out["warm_cache"] = _retrain(data_dir, dataset, force=True)
    if args.cold:
        shutil.rmtree(data_dir / "cache", ignore_errors=True)
        out["cold_cache"] = _retrain(data_dir, dataset, force=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    cv = sub.add_parser("cv")
    cv.add_argument("--size", type=int, default=320)
    cv.add_argument("--contrast", default="clahe")
    cv.add_argument("--cutoff", default="block15")
    cv.add_argument("--views", type=int, default=3)
    cv.add_argument("--head-epochs", type=int, default=6)
    cv.add_argument("--epochs", type=int, default=8)
    cv.add_argument("--lr-body", type=float, default=2e-4)
    cv.add_argument("--lr-head", type=float, default=1e-3)
    cv.add_argument("--folds", type=int, default=5)
    cv.add_argument("--balance", default="class", choices=["class", "source_class"])
    cv.add_argument("--limit", type=int, default=0)
    cv.add_argument("--cache", default="/tmp/cxr-bench-cache")
    for name in ("bootstrap", "nightly"):
        sp = sub.add_parser(name)
        sp.add_argument("--data-dir", default="/tmp/cxr-bench-data")
        if name == "nightly":
            sp.add_argument("--images", type=int, default=1000)
            sp.add_argument("--cold", action="store_true", help="also with an empty cache")
    for sp in sub.choices.values():
        sp.add_argument("--dataset", default=str(SHARED))
        sp.add_argument("--out", default="")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = {"cv": cmd_cv, "bootstrap": cmd_bootstrap, "nightly": cmd_nightly}[args.cmd](args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
