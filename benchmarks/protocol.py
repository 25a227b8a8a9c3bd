"""The honest internal protocol: patient-grouped CV and leave-one-source-out, with
near-duplicate films across patients kept on one side of every split.

    python -m benchmarks.protocol features --dataset ../shared/data/cxr --variant whole
    python -m benchmarks.protocol segmenter --dataset ../shared/data/cxr
    python -m benchmarks.protocol evaluate --dataset ../shared/data/cxr --variants whole border

Every figure comes from images of patients (and near-duplicate groups) that the model
scoring them never saw.  Variants are preprocessing choices (``whole`` image, ``border``
masking, ``lungcrop`` / ``lungmask`` from a small segmenter trained on the lung masks,
``hires`` at 448 px, ``aug`` with strongly augmented training views); each is scored by a
frozen EfficientNet-Lite0 with logistic regression, two-class (COVID vs rest) and
three-class (normal / other pneumonia / COVID).  The fine-tuned three-class model of
``trainer.train`` runs through the same folds with ``finetune``.  Work files live under
``--work`` (default /tmp/cxr14); they hold features, never images.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from dicom_node.pixels import load_image_file
from trainer.metrics import delong_ci
from trainer.transforms import Letterbox, prepare_image

log = logging.getLogger("protocol")

CLASSES = ("normal", "other_pneumonia", "covid")
SIZES = {"whole": 320, "border": 320, "lungcrop": 320, "lungmask": 320, "hires": 448,
         "aug": 320}
#: The ``aug`` variant's ranges (and ``finetune --augmentation strong``): about one and a
#: half times the default rotation, scale, shift and intensity jitter.
STRONG_AUGMENTATION = {"rotate_degrees": 15.0, "scale": (0.8, 1.2), "translate": 0.1,
                       "brightness": 0.2, "contrast": 0.3, "gamma": (0.7, 1.4)}


@dataclass(frozen=True)
class Row:
    path: Path
    rel: str
    y3: int  # index into CLASSES
    patient: str
    source: str


def read_rows(dataset: Path) -> list[Row]:
    out = []
    with (dataset / "labels.csv").open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            out.append(Row(dataset / r["path"], r["path"], CLASSES.index(r["label_name"]),
                           r["patient_id"], r["source"]))
    return out


# ---------------------------------------------------------------- lung segmenter


class TinyUNet(nn.Module):
    """A three-level U-Net at 96 px: enough for lung fields, trains in minutes on a CPU."""

    def __init__(self, w: int = 8) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(True),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(True))

        self.e1, self.e2, self.e3 = block(1, w), block(w, 2 * w), block(2 * w, 4 * w)
        self.d2, self.d1 = block(6 * w, 2 * w), block(3 * w, w)
        self.out = nn.Conv2d(w, 1, 1)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e1(x)
        b = self.e2(self.pool(a))
        c = self.e3(self.pool(b))
        d = self.d2(torch.cat([self.up(c), b], 1))
        return self.out(self.d1(torch.cat([self.up(d), a], 1)))  # type: ignore[no-any-return]


SEG = 96


def _seg_input(img: np.ndarray) -> tuple[np.ndarray, Letterbox]:
    return prepare_image(img, SEG, "clahe")


def train_segmenter(dataset: Path, work: Path, epochs: int = 6) -> dict[str, Any]:
    rows = {r.rel: r for r in read_rows(dataset)}
    pairs = []
    with (dataset / "lung_masks.csv").open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            pairs.append((rows[r["path"]], dataset / r["mask"]))
    xs, ms, pats = [], [], []
    for row, mpath in pairs:
        sq, _ = _seg_input(load_image_file(row.path))
        mask = (cv2.imread(str(mpath), cv2.IMREAD_GRAYSCALE) > 127).astype(np.float32)
        msq, _ = prepare_image(mask, SEG, "none")
        xs.append(sq)
        ms.append((msq > 0.5).astype(np.float32))
        pats.append(row.patient)
    x = torch.from_numpy(np.stack(xs)).unsqueeze(1)
    m = torch.from_numpy(np.stack(ms)).unsqueeze(1)
    # hold out one patient in five to report the Dice on patients the segmenter never saw
    rng = np.random.default_rng(0)
    upats = sorted(set(pats))
    held = set(rng.choice(upats, size=len(upats) // 5, replace=False).tolist())
    te = np.array([p in held for p in pats])
    torch.manual_seed(0)
    net = TinyUNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    tr_idx = np.flatnonzero(~te)
    t0 = time.perf_counter()
    for ep in range(epochs):
        net.train()
        perm = rng.permutation(tr_idx)
        for s in range(0, len(perm), 16):
            idx = torch.from_numpy(perm[s:s + 16])
            xb, mb = x[idx], m[idx]
            # light geometric jitter: shift and scale
            theta = torch.zeros(len(idx), 2, 3)
            sc = 1 + (torch.rand(len(idx)) - 0.5) * 0.2
            theta[:, 0, 0] = sc
            theta[:, 1, 1] = sc
            theta[:, :, 2] = (torch.rand(len(idx), 2) - 0.5) * 0.15
            grid = nn.functional.affine_grid(theta, list(xb.shape), align_corners=False)
            xb = nn.functional.grid_sample(xb, grid, align_corners=False)
            mb = nn.functional.grid_sample(mb, grid, align_corners=False)
            logit = net(xb)
            prob = torch.sigmoid(logit)
            dice = 1 - (2 * (prob * mb).sum() + 1) / (prob.sum() + mb.sum() + 1)
            loss = nn.functional.binary_cross_entropy_with_logits(logit, mb) + dice
            opt.zero_grad()
            loss.backward()
            opt.step()
        log.info("segmenter epoch %d loss %.4f", ep + 1, float(loss.detach()))
    net.eval()
    with torch.no_grad():
        pred = (torch.sigmoid(net(x[torch.from_numpy(np.flatnonzero(te))])) > 0.5).float()
    gt = m[torch.from_numpy(np.flatnonzero(te))]
    dices = (2 * (pred * gt).sum((1, 2, 3)) / (pred.sum((1, 2, 3)) + gt.sum((1, 2, 3)) + 1e-6))
    seconds = time.perf_counter() - t0
    torch.save(net.state_dict(), work / "segmenter.pt")
    info = {"train_images": int((~te).sum()), "held_out_images": int(te.sum()),
            "held_out_dice_mean": float(dices.mean()), "seconds": seconds}
    (work / "segmenter.json").write_text(json.dumps(info, indent=1))
    return info


def lung_masks_predicted(rows: Sequence[Row], work: Path) -> list[np.ndarray]:
    """Predicted lung mask per image, on the segmenter's square letterbox, cached."""
    cache = work / "predicted_masks.npy"
    if cache.is_file():
        return list(np.load(cache))
    net = TinyUNet()
    net.load_state_dict(torch.load(work / "segmenter.pt", weights_only=True))
    net.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(rows), 32):
            sq = [_seg_input(load_image_file(r.path))[0] for r in rows[s:s + 32]]
            p = torch.sigmoid(net(torch.from_numpy(np.stack(sq)).unsqueeze(1)))[:, 0].numpy()
            out.extend(p > 0.5)
    np.save(cache, np.stack(out))
    return out


def _largest_two(mask: np.ndarray) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    if n <= 1:
        return mask.astype(bool)
    order = np.argsort(-stats[1:, cv2.CC_STAT_AREA])[:2] + 1
    return np.isin(lab, order)


# ---------------------------------------------------------------- preprocessing variants


def variant_image(img: np.ndarray, variant: str, mask128: np.ndarray | None) -> np.ndarray:
    """The [0, 1] image the variant feeds to the letterbox."""
    h, w = img.shape
    if variant == "border":
        # burned-in text and lead markers sit at the edges and in the corners
        out = img.copy()
        bh, bw = int(0.08 * h), int(0.08 * w)
        out[:bh], out[-bh:], out[:, :bw], out[:, -bw:] = 0, 0, 0, 0
        ch, cw = int(0.2 * h), int(0.2 * w)
        for ys in (slice(0, ch), slice(h - ch, h)):
            for xs in (slice(0, cw), slice(w - cw, w)):
                out[ys, xs] = 0
        return out
    if variant in ("lungcrop", "lungmask"):
        assert mask128 is not None
        _, box = prepare_image(img, SEG, "none")
        lung = _largest_two(mask128)
        if lung.mean() < 0.05:  # segmenter found no lungs: keep the whole image
            return img
        src = box.to_source(lung.astype(np.float32)) > 0.5
        if variant == "lungmask":
            k = max(3, int(0.04 * max(h, w)))
            src = cv2.dilate(src.astype(np.uint8), np.ones((k, k), np.uint8)) > 0
            return img * src
        top, left, bottom, right = crop_box(src)
        return img[top:bottom, left:right]
    return img


def crop_box(lung: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the lung fields with a 5% margin, in ``lung``'s frame."""
    h, w = lung.shape
    ys, xs = np.nonzero(lung)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    my, mx = int(0.05 * (y1 - y0)), int(0.05 * (x1 - x0))
    return max(0, y0 - my), max(0, x0 - mx), min(h, y1 + my + 1), min(w, x1 + mx + 1)


def _backbone() -> nn.Module:
    from trainer.efficientnet_lite import efficientnet_lite0

    return efficientnet_lite0(pretrained=True).eval()


def compute_features(dataset: Path, work: Path, variant: str, aug_views: int = 0) -> None:
    """Pooled 1280-d features per image (plus augmented views), and the final feature maps
    with letterboxes of the images that have lung masks (for Grad-CAM peaks)."""
    from trainer.transforms import Augmentation, augment

    rows = read_rows(dataset)
    size = SIZES[variant]
    masks = lung_masks_predicted(rows, work) if variant in ("lungcrop", "lungmask") else None
    masked = _masked_paths(dataset)
    net = _backbone()
    torch.set_num_threads(1)
    strong = Augmentation(**STRONG_AUGMENTATION)  # type: ignore[arg-type]
    pooled = np.zeros((len(rows), 1 + aug_views, 1280), np.float32)
    maps: dict[str, np.ndarray] = {}
    boxes: dict[str, list[float]] = {}
    gen = torch.Generator().manual_seed(7)
    t0 = time.perf_counter()
    for s in range(0, len(rows), 16):
        chunk = rows[s:s + 16]
        sq, bx, crops = [], [], []
        for i, r in enumerate(chunk):
            img = load_image_file(r.path)
            vimg = variant_image(img, variant, masks[s + i] if masks is not None else None)
            q, b = prepare_image(vimg, size, "clahe")
            sq.append(q)
            bx.append(b)
            # where the variant's image sits in the film (a crop moves it)
            off = (0, 0)
            if variant == "lungcrop" and vimg.shape != img.shape and masks is not None:
                _, sbox = prepare_image(img, SEG, "none")
                lung = sbox.to_source(_largest_two(masks[s + i]).astype(np.float32)) > 0.5
                off = crop_box(lung)[:2]
            crops.append((off, img.shape))
        x = torch.from_numpy(np.stack(sq)).unsqueeze(1)
        views = [x] + [augment(x, gen, strong) for _ in range(aug_views)]
        with torch.inference_mode():
            for v, xv in enumerate(views):
                fm = net.features((xv.expand(-1, 3, -1, -1) - 0.5) / 0.5)
                pooled[s:s + len(chunk), v] = fm.mean((2, 3)).numpy()
                if v == 0:
                    for i, r in enumerate(chunk):
                        if r.rel in masked:
                            maps[r.rel] = fm[i].numpy().astype(np.float16)
                            b = bx[i]
                            (oy, ox), (fh, fw) = crops[i]
                            boxes[r.rel] = [b.size, b.scale, b.top, b.left, b.height, b.width,
                                            b.source_height, b.source_width, oy, ox, fh, fw]
        log.info("%s features %d/%d %.0fs", variant, s + len(chunk), len(rows),
                 time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    np.save(work / f"pooled_{variant}.npy", pooled)
    np.savez_compressed(work / f"maps_{variant}.npz", **{k.replace("/", "|"): v
                                                        for k, v in maps.items()})
    (work / f"meta_{variant}.json").write_text(json.dumps(
        {"boxes": boxes, "seconds": seconds, "size": size, "aug_views": aug_views}))


def _masked_paths(dataset: Path) -> dict[str, Path]:
    with (dataset / "lung_masks.csv").open(newline="", encoding="utf-8") as fh:
        return {r["path"]: dataset / r["mask"] for r in csv.DictReader(fh)}


# ---------------------------------------------------------------- splits


def hashes(rows: Sequence[Row], work: Path) -> dict[str, int]:
    from trainer.near_duplicates import perceptual_hash

    cache = work / "phash.json"
    if cache.is_file():
        return {k: int(v) for k, v in json.loads(cache.read_text()).items()}
    out = {r.rel: perceptual_hash(load_image_file(r.path)) for r in rows}
    cache.write_text(json.dumps({k: str(v) for k, v in out.items()}))
    return out


def groups(rows: Sequence[Row], work: Path, max_distance: int) -> tuple[np.ndarray, list[Any]]:
    """One group id per image: patients joined by near-duplicate films (union-find)."""
    from trainer.near_duplicates import near_duplicate_groups

    parent = {r.patient: r.patient for r in rows}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    dups = near_duplicate_groups(hashes(rows, work), max_distance)
    by_rel = {r.rel: r for r in rows}
    cross = []
    for g in dups:
        pats = sorted({by_rel[k].patient for k in g})
        if len(pats) > 1:
            cross.append({"images": sorted(g), "patients": pats,
                          "sources": sorted({by_rel[k].source for k in g})})
        for p in pats[1:]:
            parent[find(p)] = find(pats[0])
    roots = sorted({find(r.patient) for r in rows})
    index = {root: i for i, root in enumerate(roots)}
    return np.array([index[find(r.patient)] for r in rows]), cross


def grouped_folds(y3: np.ndarray, g: np.ndarray, k: int = 5,
                  seed: int = 0) -> list[np.ndarray]:
    from sklearn.model_selection import StratifiedGroupKFold

    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [te for _, te in cv.split(np.zeros(len(y3)), y3, g)]


def loso_folds(rows: Sequence[Row], g: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Test on one source; train on the others minus any group that touches it."""
    src = np.array([r.source for r in rows])
    out = {}
    for s in sorted(set(src)):
        te = np.flatnonzero(src == s)
        touched = set(g[te].tolist())
        tr = np.flatnonzero((src != s) & ~np.isin(g, list(touched)))
        out[s] = (tr, te)
    return out


# ---------------------------------------------------------------- models and metrics


def fit_lr(x: np.ndarray, y: np.ndarray, c: float = 0.05) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000,
                                                              class_weight="balanced")).fit(x, y)


def scores_lr(model: Any, x: np.ndarray, three: bool) -> tuple[np.ndarray, np.ndarray | None]:
    p = model.predict_proba(x)
    if not three:
        return p[:, 1], None
    return p[:, 2], p[:, 1] + p[:, 2]


def cam_peak_inside(model: Any, three: bool, rel: str, fmap: np.ndarray, box: list[float],
                    mask_path: Path) -> bool:
    """Grad-CAM of the COVID logit on the last feature map.  With a linear head on
    average-pooled standardised features the gradient weights are w_c / sd_c."""
    scaler, lr = model[0], model[1]
    w = lr.coef_[2 if three else 0] / scaler.scale_
    if three:  # softmax: the COVID logit relative to the mean of the others
        w = w - (lr.coef_[0] + lr.coef_[1]) / 2 / scaler.scale_
    cam = np.maximum(np.tensordot(w, fmap.astype(np.float32), axes=(0, 0)), 0)
    lb = Letterbox(int(box[0]), float(box[1]), int(box[2]), int(box[3]), int(box[4]),
                   int(box[5]), int(box[6]), int(box[7]))
    src = lb.to_source(cv2.resize(cam, (lb.size, lb.size), interpolation=cv2.INTER_LINEAR))
    if len(box) == 12:  # the variant's image is a crop of the film: put it back in place
        oy, ox, fh, fw = (int(v) for v in box[8:])
        film = np.zeros((fh, fw), np.float32)
        film[oy:oy + src.shape[0], ox:ox + src.shape[1]] = src
        src = film
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 127
    if mask.shape != src.shape:
        mask = cv2.resize(mask.astype(np.uint8), src.shape[::-1],
                          interpolation=cv2.INTER_NEAREST) > 0
    yx = np.unravel_index(int(np.argmax(src)), src.shape)
    return bool(mask[yx])


def auc_ci(y: np.ndarray, p: np.ndarray) -> dict[str, Any] | None:
    if len(set(y.tolist())) < 2:
        return None
    auc, ci = delong_ci(y, p)
    return {"auc": round(float(auc), 3), "ci": [round(v, 3) for v in ci or []],
            "n": int(len(y)), "n_pos": int(y.sum())}


def summarise(rows: Sequence[Row], idx: np.ndarray, pc: np.ndarray,
              pp: np.ndarray | None) -> dict[str, Any]:
    y3 = np.array([rows[i].y3 for i in idx])
    src = np.array([rows[i].source for i in idx])
    pc, ppn = pc[idx], (pp[idx] if pp is not None else None)
    covid = (y3 == 2).astype(int)
    out: dict[str, Any] = {"covid_vs_rest": auc_ci(covid, pc)}
    pneu = (y3 > 0).astype(int)
    # the two-class model has no pneumonia output: its COVID score stands in for it
    pscore = ppn if ppn is not None else pc
    out["pneumonia_vs_normal"] = auc_ci(pneu, pscore)
    per: dict[str, Any] = {}
    for s in sorted(set(src)):
        m = src == s
        d = {"covid_vs_rest": auc_ci(covid[m], pc[m]),
             "pneumonia_vs_normal": auc_ci(pneu[m], pscore[m])}
        pn = m & (y3 > 0)
        d["covid_vs_other_pneumonia"] = auc_ci(covid[pn], pc[pn])
        per[s] = d
    out["per_source"] = per
    return out


def evaluate(dataset: Path, work: Path, variants: Sequence[str],
             max_distance: int) -> dict[str, Any]:
    rows = read_rows(dataset)
    y3 = np.array([r.y3 for r in rows])
    g, cross = groups(rows, work, max_distance)
    folds = grouped_folds(y3, g)
    loso = loso_folds(rows, g)
    masked = _masked_paths(dataset)
    result: dict[str, Any] = {
        "images": len(rows), "patients": len({r.patient for r in rows}),
        "near_duplicates": {"max_distance": max_distance, "cross_patient_groups": len(cross),
                            "images": sum(len(c["images"]) for c in cross),
                            "cross_source_groups": sum(len(c["sources"]) > 1 for c in cross),
                            "examples": cross[:10]},
        "variants": {},
    }
    for variant in variants:
        pooled = np.load(work / f"pooled_{variant}.npy")
        meta = json.loads((work / f"meta_{variant}.json").read_text())
        maps = np.load(work / f"maps_{variant}.npz")
        vres: dict[str, Any] = {"feature_seconds": round(meta["seconds"], 1),
                                "input_size": meta["size"]}
        for three in (False, True):
            name = "lr3" if three else "lr2"
            res: dict[str, Any] = {}
            for proto, splits in (("grouped_cv", [(np.setdiff1d(np.arange(len(rows)), te), te)
                                                  for te in folds]),
                                  ("leave_source_out", list(loso.values()))):
                pc = np.full(len(rows), np.nan)
                pp = np.full(len(rows), np.nan) if three else None
                inside, total = 0, 0
                t0 = time.perf_counter()
                for tr, te in splits:
                    x = pooled[tr].reshape(-1, 1280)
                    yy = np.repeat(y3[tr] if three else (y3[tr] == 2).astype(int),
                                   pooled.shape[1])
                    model = fit_lr(x, yy)
                    a, b = scores_lr(model, pooled[te, 0], three)
                    pc[te] = a
                    if pp is not None and b is not None:
                        pp[te] = b
                    for i in te:
                        key = rows[i].rel
                        if key in masked and key.replace("/", "|") in maps.files:
                            total += 1
                            inside += cam_peak_inside(model, three, key,
                                                      maps[key.replace("/", "|")],
                                                      meta["boxes"][key], masked[key])
                seconds = time.perf_counter() - t0
                tested = np.flatnonzero(~np.isnan(pc))
                summ = summarise(rows, tested, pc, pp)
                summ["cam_peaks_inside_lungs"] = {"inside": inside, "of": total,
                                                  "share": round(inside / max(total, 1), 3)}
                summ["train_seconds"] = round(seconds, 1)
                res[proto] = summ
                log.info("%s %s %s covid %s", variant, name, proto, summ["covid_vs_rest"])
            vres[name] = res
        result["variants"][variant] = vres
    return result


def _gradcam_peaks(result: Any, rows: Sequence[Row], masked: dict[str, Path]) -> tuple[int, int]:
    """(peaks inside the lung mask, images with a mask) for the whole network's Grad-CAM."""
    from trainer.checkpoint import LoadedModel
    from trainer.scoring import Scorer

    scorer = Scorer(LoadedModel(model=result.model.eval(), meta=result.meta, sha256=""), "cpu")
    todo = [r for r in rows if r.rel in masked]
    inside = 0
    for s in range(0, len(todo), 16):
        chunk = todo[s:s + 16]
        maps = scorer.findings_and_gradcam([load_image_file(r.path) for r in chunk])[0]
        for r, cam in zip(chunk, maps, strict=True):
            mask = cv2.imread(str(masked[r.rel]), cv2.IMREAD_GRAYSCALE) > 127
            if mask.shape != cam.shape:
                mask = cv2.resize(mask.astype(np.uint8), cam.shape[::-1],
                                  interpolation=cv2.INTER_NEAREST) > 0
            inside += bool(mask[np.unravel_index(int(np.argmax(cam)), cam.shape)])
    return inside, len(todo)


def finetune(dataset: Path, work: Path, max_distance: int, protocols: Sequence[str],
             size: int, views: int, head_epochs: int, epochs: int,
             max_folds: int | None = None, augmentation: str = "default",
             balance: str = "class", tag: str = "",
             only: Sequence[str] = (), seed: int | None = None) -> dict[str, Any]:
    """The project's own three-class trainer (``trainer.train.train_model``, the default
    configuration but for the options given) through the same folds as the baselines.
    Each fold's training patients are split again, by group, into training and validation
    (for early stopping and the thresholds); the held-out fold is scored by the whole
    network.  Scores go to ``finetune_partial_<tag><protocol>.npy`` after every fold, so an
    interrupted run still leaves the folds it finished.  ``only`` (fold names: ``fold1``
    ... or a held-out source) trains just those splits, with the validation patients they
    get in the full run, so a variant can be compared fold for fold."""
    from dataclasses import replace as dc_replace

    from trainer.datasets import folder_records
    from trainer.evaluate import predict_findings_records
    from trainer.train import TrainConfig, train_model
    from trainer.transforms import Augmentation

    rows = read_rows(dataset)
    records = {r.key.split("/", 1)[1]: r for r in folder_records(dataset)}
    recs = [records[r.rel] for r in rows]
    y3 = np.array([r.y3 for r in rows])
    g, _ = groups(rows, work, max_distance)
    splits: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    if "grouped_cv" in protocols:
        splits += [("grouped_cv", f"fold{i + 1}", np.setdiff1d(np.arange(len(rows)), te), te)
                   for i, te in enumerate(grouped_folds(y3, g)[:max_folds])]
    loso = loso_folds(rows, g)
    splits += [("leave_source_out", s, tr, te) for s, (tr, te) in loso.items()
               if f"lso:{s}" in protocols]
    cfg = dc_replace(TrainConfig(), input_size=size, views=views, head_epochs=head_epochs,
                     epochs=epochs, device="cpu", balance=balance)
    if seed is not None:
        cfg = dc_replace(cfg, seed=seed)
    if augmentation == "strong":
        cfg = dc_replace(cfg, augmentation=Augmentation(
            **STRONG_AUGMENTATION))  # type: ignore[arg-type]
    out: dict[str, Any] = {"config": {k: str(v) for k, v in cfg.public().items()}, "folds": []}
    preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    cam_in: dict[str, tuple[int, int]] = {}
    masked = _masked_paths(dataset)
    rng = np.random.default_rng(1)
    for proto, name, tr, te in splits:
        t0 = time.perf_counter()
        ug = np.unique(g[tr])
        val_groups = set(rng.choice(ug, size=max(1, len(ug) // 5), replace=False).tolist())
        val_mask = np.isin(g[tr], list(val_groups))
        if only and name not in only:
            continue
        result = train_model([recs[i] for i in tr[~val_mask]], [recs[i] for i in tr[val_mask]],
                             cfg, cache_root=work / "cache")
        t_trained = time.perf_counter()
        pc, pp = predict_findings_records(result.model, result.meta, [recs[i] for i in te])
        t_scored = time.perf_counter()
        inside, total = _gradcam_peaks(result, [rows[i] for i in te], masked)
        cam_in[proto] = (cam_in.get(proto, (0, 0))[0] + inside,
                         cam_in.get(proto, (0, 0))[1] + total)
        pc_all, pp_all = preds.setdefault(proto, (np.full(len(rows), np.nan),
                                                  np.full(len(rows), np.nan)))
        pc_all[te] = pc
        if pp is not None:
            pp_all[te] = pp
        seconds = time.perf_counter() - t0
        out["folds"].append({"protocol": proto, "fold": name,
                             "train": int((~val_mask).sum()),
                             "validation": int(val_mask.sum()), "test": int(len(te)),
                             "seconds": round(seconds, 1),
                             "train_seconds": round(t_trained - t0, 1),
                             "score_seconds": round(t_scored - t_trained, 1),
                             "cam_inside": inside, "cam_of": total,
                             "best_epoch": result.history[-1].get("best_epoch")
                             if result.history else None,
                             "epochs_run": len(result.history),
                             "timings": result.timings})
        log.info("finetune %s %s done in %.0fs timings %s", proto, name, seconds,
                 result.timings)
        (work / f"finetune_partial_{tag}.json").write_text(json.dumps(out, indent=1,
                                                                      default=str))
        np.save(work / f"finetune_partial_{tag}{proto}.npy", np.stack([pc_all, pp_all]))
    for proto, (pc_all, pp_all) in preds.items():
        tested = np.flatnonzero(~np.isnan(pc_all))
        out[proto] = summarise(rows, tested, pc_all, pp_all)
        inside, total = cam_in.get(proto, (0, 0))
        out[proto]["cam_peaks_inside_lungs"] = {"inside": inside, "of": total,
                                                "share": round(inside / max(total, 1), 3)}
        out[proto]["train_seconds"] = round(sum(f["seconds"] for f in out["folds"]
                                                if f["protocol"] == proto), 1)
        np.save(work / f"finetune_{tag}{proto}.npy", np.stack([pc_all, pp_all]))
    return out


def _lr_splits(rows: Sequence[Row], y3: np.ndarray, g: np.ndarray, proto: str,
               tested: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, test) splits of ``proto`` whose test images were all scored."""
    if proto == "grouped_cv":
        splits = [(np.setdiff1d(np.arange(len(rows)), te), te) for te in grouped_folds(y3, g)]
    else:
        splits = list(loso_folds(rows, g).values())
    return [(tr, te) for tr, te in splits if np.isin(te, tested).all()]


def compare(dataset: Path, work: Path, max_distance: int, variant: str = "whole",
            proto: str = "grouped_cv", tag: str = "") -> dict[str, Any]:
    """The fine-tuned model against frozen features + LR on exactly the images it scored
    (the same folds, grouped or leave-source-out), with paired DeLong differences on the
    overall and within-source questions."""
    from trainer.metrics import delong_paired

    rows = read_rows(dataset)
    y3 = np.array([r.y3 for r in rows])
    g, _ = groups(rows, work, max_distance)
    pc_ft, pp_ft = np.load(work / f"finetune_partial_{tag}{proto}.npy")
    tested = np.flatnonzero(~np.isnan(pc_ft))
    pooled = np.load(work / f"pooled_{variant}.npy")
    out: dict[str, Any] = {"images": int(len(tested)), "protocol": proto, "tag": tag,
                           "finetuned": summarise(rows, tested, pc_ft, pp_ft)}
    lr: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for three in (False, True):
        pc = np.full(len(rows), np.nan)
        pp = np.full(len(rows), np.nan) if three else None
        for tr, te in _lr_splits(rows, y3, g, proto, tested):
            yy = y3[tr] if three else (y3[tr] == 2).astype(int)
            model = fit_lr(pooled[tr, 0], yy)
            a, b = scores_lr(model, pooled[te, 0], three)
            pc[te] = a
            if pp is not None and b is not None:
                pp[te] = b
        name = "lr3" if three else "lr2"
        lr[name] = (pc, pp)
        out[name] = summarise(rows, tested, pc, pp)
    src = np.array([r.source for r in rows])
    paired: dict[str, Any] = {}
    for name, (pc, pp) in lr.items():
        sel = tested
        paired[f"covid_vs_rest finetuned - {name}"] = delong_paired(
            (y3[sel] == 2).astype(int), pc[sel], pc_ft[sel])
        ie = sel[(src[sel] == "ieee8023") & (y3[sel] > 0)]
        if len(set(y3[ie].tolist())) == 2:
            paired[f"ieee8023 covid_vs_other_pneumonia finetuned - {name}"] = delong_paired(
                (y3[ie] == 2).astype(int), pc[ie], pc_ft[ie])
        if pp is not None:
            nih = sel[src[sel] == "nih"]
            if len(set((y3[nih] > 0).tolist())) == 2:
                paired[f"nih pneumonia_vs_normal finetuned - {name}"] = delong_paired(
                    (y3[nih] > 0).astype(int), pp[nih], pp_ft[nih])
            paired[f"pneumonia_vs_normal finetuned - {name}"] = delong_paired(
                (y3[sel] > 0).astype(int), pp[sel], pp_ft[sel])
    out["paired_delong"] = paired
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.protocol", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command",
                   choices=["features", "segmenter", "evaluate", "finetune", "compare"])
    p.add_argument("--dataset", type=Path, default=Path("../shared/data/cxr"))
    p.add_argument("--work", type=Path, default=Path("/tmp/cxr14"))
    p.add_argument("--variant", default="whole", choices=sorted(SIZES))
    p.add_argument("--variants", nargs="*", default=["whole"])
    p.add_argument("--max-distance", type=int, default=56)
    p.add_argument("--out", type=Path)
    p.add_argument("--protocols", nargs="*", default=["grouped_cv"],
                   help="finetune: grouped_cv and/or lso:<source>")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--head-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--max-folds", type=int, help="finetune: only the first N grouped folds")
    p.add_argument("--augmentation", default="default", choices=["default", "strong"],
                   help="finetune: the trainer's augmentation ranges, or the aug variant's")
    p.add_argument("--balance", default="class", choices=["class", "source_class"],
                   help="finetune: the trainer's loss weighting")
    p.add_argument("--tag", default="",
                   help="finetune / compare: prefix of the score files, one per variant")
    p.add_argument("--seed", type=int,
                   help="finetune: the trainer's seed (default: TrainConfig's), for run-to-run "
                        "spread")
    p.add_argument("--only", nargs="*", default=[],
                   help="finetune: train only these splits (fold1..fold5, held-out sources)")
    p.add_argument("--protocol", default="grouped_cv",
                   choices=["grouped_cv", "leave_source_out"], help="compare: which scores")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.command == "segmenter":
        print(json.dumps(train_segmenter(args.dataset, args.work)))
    elif args.command == "features":
        compute_features(args.dataset, args.work, args.variant,
                         aug_views=2 if args.variant == "aug" else 0)
    elif args.command == "finetune":
        res = finetune(args.dataset, args.work, args.max_distance, args.protocols, args.size,
                       args.views, args.head_epochs, args.epochs, args.max_folds,
                       args.augmentation, args.balance, args.tag, args.only,
                       args.seed)
        text = json.dumps(res, indent=1, default=str)
        if args.out:
            args.out.write_text(text)
        print(text)
    elif args.command == "compare":
        res = compare(args.dataset, args.work, args.max_distance, args.variant, args.protocol,
                      args.tag)
        text = json.dumps(res, indent=1, default=str)
        if args.out:
            args.out.write_text(text)
        print(text)
    else:
        res = evaluate(args.dataset, args.work, args.variants, args.max_distance)
        text = json.dumps(res, indent=1)
        if args.out:
            args.out.write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
