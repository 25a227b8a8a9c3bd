"""Latency from "study queued" to "SR and SC stored in Orthanc" for one-image studies.

Not part of CI.  Runs real parts on this host: a SQLite database, Redis at 127.0.0.1:6379
(unique queue names), one inference worker and one delivery worker (``celery -A worker
worker``), and Orthanc as the PACS.  The model is resnet18 with random initialisation
(timing only; its scores mean nothing), registered through trainer.registry.

    python benchmarks/latency.py --studies 20 --methods gradcam occlusion
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from db.broker import ANALYSE_TASK, make_celery  # noqa: E402
from db.session import Database  # noqa: E402
from db.settings import load_settings  # noqa: E402
from tests.support.dicom_factory import make_cxr, write  # noqa: E402
from tests.support.services import make_orthanc  # noqa: E402
from tests.support.worker_data import add_study, register_and_promote  # noqa: E402
from tests.support.worker_process import WorkerProcess  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run(method: str, studies: int, architecture: str, input_size: int, size: int,
        workdir: Path) -> list[float]:
    orthanc = make_orthanc(workdir / "orthanc")
    orthanc.start()
    tag = uuid.uuid4().hex[:10]
    settings = load_settings(env={}, overrides=dict(
        data_dir=workdir / "data", broker_url="redis://127.0.0.1:6379/0",
        inference_queue=f"bench-inference-{tag}", delivery_queue=f"bench-delivery-{tag}",
        pacs=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", heatmap_method=method,
        log_level="INFO"))
    settings.ensure_dirs()
    db = Database(settings)
    register_and_promote(db, settings, f"bench-{architecture}-{tag}",
                         architecture=architecture, input_size=input_size)
    workers = [WorkerProcess(settings, [settings.inference_queue], workdir / "logs"),
               WorkerProcess(settings, [settings.delivery_queue], workdir / "logs")]
    app = make_celery(settings)
    latencies: list[float] = []
    try:
        for w in workers:
            w.start(wait_ready=False)
        for w in workers:
            w.wait_for_log("ready.", 120)
        for i in range(studies + 1):  # the first study warms the model up and is dropped
            ds = make_cxr(rows=size, cols=size, seed=i)
            study_id = add_study(db, settings, [write(ds, workdir / "in" / f"{i}.dcm")])
            t0 = time.perf_counter()
            app.send_task(ANALYSE_TASK, args=[study_id, 1], queue=settings.inference_queue)
            query = {"Level": "Instance", "Query": {"StudyInstanceUID": ds.StudyInstanceUID}}
            while len(orthanc.post("/tools/find", query)) < 2:
                if time.perf_counter() - t0 > 600:
                    raise RuntimeError(f"study {i} not delivered:\n{workers[0].log()[-3000:]}")
                time.sleep(0.01)
            elapsed = time.perf_counter() - t0
            if i:
                latencies.append(elapsed)
            print(f"{method} study {i}: {elapsed:.3f} s", flush=True)
    finally:
        for w in workers:
            w.stop()
        orthanc.stop()
        db.dispose()
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=["gradcam", "occlusion"])
    parser.add_argument("--architecture", default="resnet18")
    parser.add_argument("--input-size", type=int, default=320)
    parser.add_argument("--image-size", type=int, default=1024)
    args = parser.parse_args(argv)
    for method in args.methods:
        with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
            lat = run(method, args.studies, args.architecture, args.input_size,
                      args.image_size, Path(tmp))
        print(f"RESULT method={method} architecture={args.architecture} "
              f"input={args.input_size} image={args.image_size}x{args.image_size} "
              f"n={len(lat)} median={statistics.median(lat):.3f}s "
              f"p95={percentile(lat, 0.95):.3f}s min={min(lat):.3f}s max={max(lat):.3f}s",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
