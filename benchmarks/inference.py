"""Throughput of the scoring path against the bare torchvision model, in one run.

    python benchmarks/inference.py --backbones resnet18,efficientnet_lite0 --batch 8

For each backbone it measures, at the same batch size and input size:

- bare eager: the model on an already prepared tensor (contiguous, then channels_last,
  optionally ``torch.compile``): the ceiling;
- scoring path: DICOM files -> decode (thread pool, overlapped with the forward pass of
  the previous batch) -> letterbox + transforms -> ``Scorer.predict`` -> probabilities;
- heatmaps: milliseconds per image for Grad-CAM and occlusion (N, S, batch as given).

Not part of CI.  Runs unchanged on CUDA (``--device cuda``).  Weights are random for the
torchvision backbones (no download here); speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.pixels import load_image_file  # noqa: E402
from trainer.architectures import build_model  # noqa: E402
from trainer.checkpoint import (  # noqa: E402
    ModelMeta,
    Preprocessing,
    load_checkpoint,
    resolve_device,
    save_checkpoint,
)
from trainer.scoring import Scorer  # noqa: E402

SHARED_DICOM = ROOT.parent / "shared" / "data" / "cxr" / "dicom"


def chest_files(batch: int) -> list[Path]:
    """The shared real chest DICOM files (cycled to one batch), or synthetic ones."""
    files = [p for p in sorted(SHARED_DICOM.glob("*.dcm")) if not p.name.startswith("nonchest")]
    if not files:
        from tests.support.dicom_factory import make_cxr, write

        tmp = Path(tempfile.mkdtemp(prefix="bench-dicom-"))
        files = [write(make_cxr(rows=1024, cols=1024, seed=i), tmp / f"{i}.dcm")
                 for i in range(3)]
    return [files[i % len(files)] for i in range(batch)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[], object], images_per_call: int, device: torch.device,
         seconds: float, warmup: int = 2) -> tuple[float, float]:
    """(images/s from the median call, median seconds per call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return images_per_call / med, med


def interleaved(calls: dict[str, Callable[[], object]], images: int, device: torch.device,
                seconds: float) -> dict[str, float]:
    """images/s per call, from medians over rounds that run every call once in turn.

    Interleaving spreads the other load on a shared machine evenly over the variants,
    so their ratio means something even when the absolute numbers drift.
    """
    for fn in calls.values():
        fn()
        fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in calls}
    start = time.perf_counter()
    while time.perf_counter() - start < seconds * len(calls) or len(times[next(iter(calls))]) < 5:
        for key, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: images / statistics.median(v) for k, v in times.items()}


def bench_backbone(name: str, args: argparse.Namespace, device: torch.device,
                   files: list[Path], pool: ThreadPoolExecutor) -> dict[str, float]:
    out: dict[str, float] = {}
    size, batch = args.size, args.batch
    meta = ModelMeta(architecture=name, input_size=size,
                     preprocessing=Preprocessing.for_backbone(name), threshold=0.5)
    torch.manual_seed(0)
    base = build_model(name, pretrained=(name == "efficientnet_lite0")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        digest = save_checkpoint(Path(tmp) / "m.pt", base, meta)
        loaded = load_checkpoint(Path(tmp) / "m.pt", digest, device=device)
        bare_model = load_checkpoint(Path(tmp) / "m.pt", digest, device=device).model
    scorer = Scorer(loaded, device)
    bare_cl = copy.deepcopy(bare_model).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def bare(m: torch.nn.Module, inp: torch.Tensor) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode():
                return m(inp)
        return call

    def decode_batch() -> list[np.ndarray]:
        return list(map(load_image_file, files))

    def serial() -> object:
        return scorer.predict(decode_batch())

    # Pipelined: the pool decodes batch i+1 while the model scores batch i.
    pending: list[Future[list[np.ndarray]]] = []

    def pipelined() -> object:
        if not pending:
            pending.append(pool.submit(decode_batch))
        images = pending.pop().result()
        pending.append(pool.submit(decode_batch))
        return scorer.predict(images)

    calls: dict[str, Callable[[], object]] = {
        "bare_eager": bare(bare_model, x),
        "bare_channels_last": bare(bare_cl, x_cl),
        "path_serial": serial,
        "path_pipelined": pipelined,
    }
    if args.compile:
        calls["bare_compiled"] = bare(torch.compile(bare_model), x)
    out.update(interleaved(calls, batch, device, args.seconds))
    if pending:
        pending.pop().result()

    t0 = time.perf_counter()
    for _ in range(3):
        decode_batch()
    out["decode_ms_per_image"] = (time.perf_counter() - t0) / (3 * batch) * 1e3
    images = decode_batch()
    t0 = time.perf_counter()
    for _ in range(3):
        scorer.prepare(images)
    out["prepare_ms_per_image"] = (time.perf_counter() - t0) / (3 * batch) * 1e3

    image = images[0]
    _, per = rate(lambda: scorer.findings_and_gradcam([image]), 1, device,
                  args.seconds, warmup=1)
    out["gradcam_ms"] = per * 1e3
    if not args.skip_occlusion:
        _, per = rate(lambda: scorer.occlusion(image, args.occlusion_size,
                                               args.occlusion_stride, args.occlusion_batch),
                      1, device, 0.0, warmup=1)
        out["occlusion_ms"] = per * 1e3
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}"


def load_note() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) during the run"
    except OSError:
        return "load average unknown"


def table(results: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    lines = [
        "| backbone | bare eager img/s | bare channels_last img/s | bare compiled img/s "
        "| path serial img/s | path pipelined img/s | path / bare eager | path / bare cl "
        "| decode ms/img | prepare ms/img | Grad-CAM ms | occlusion ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        best = max(r["path_serial"], r["path_pipelined"])

        def f(key: str, fmt: str = "{:.1f}", r: dict[str, float] = r) -> str:
            return fmt.format(r[key]) if key in r else "-"

        lines.append(
            f"| {name} | {f('bare_eager')} | {f('bare_channels_last')} | {f('bare_compiled')} "
            f"| {f('path_serial')} | {f('path_pipelined')} | {best / r['bare_eager']:.2f} "
            f"| {best / r['bare_channels_last']:.2f} "
            f"| {f('decode_ms_per_image')} | {f('prepare_ms_per_image')} "
            f"| {f('gradcam_ms', '{:.0f}')} | {f('occlusion_ms', '{:.0f}')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="resnet18,efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    ap.add_argument("--decode-workers", type=int, default=2)
    ap.add_argument("--cv2-threads", type=int, default=-1, help="OpenCV threads (-1: default)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--occlusion-size", type=int, default=32)
    ap.add_argument("--occlusion-stride", type=int, default=16)
    ap.add_argument("--occlusion-batch", type=int, default=64)
    ap.add_argument("--skip-occlusion", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cv2_threads >= 0:
        import cv2

        cv2.setNumThreads(args.cv2_threads)
    device = resolve_device(args.device)
    files = chest_files(args.batch)
    results: dict[str, dict[str, float]] = {}
    with ThreadPoolExecutor(args.decode_workers) as pool:
        for name in [b.strip() for b in args.backbones.split(",") if b.strip()]:
            results[name] = bench_backbone(name, args, device, files, pool)
            print(name, {k: round(v, 2) for k, v in results[name].items()}, flush=True)
    print()
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}; device {device}; "
          f"{torch.get_num_threads()} threads; batch {args.batch}; input {args.size}; "
          f"occlusion N={args.occlusion_size} S={args.occlusion_stride} "
          f"batch {args.occlusion_batch}; {load_note()}")
    print()
    print(table(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
