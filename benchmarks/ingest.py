"""Ingest benchmark: DCMTK storescu into the node, into DCMTK storescp, and into Orthanc.

Run from the repository root: ``python benchmarks/ingest.py`` (not part of CI).  Sends the
same synthetic 16-bit images (512x512 and 2500x2048) over loopback with one sender and with
four parallel senders, and prints a Markdown table of images/s, MB/s and node/storescp.

The node runs as ``python -m dicom_node`` with full durability (fsync of file and directory,
SQLite commit with synchronous=FULL).  storescp runs with TCP_NODELAY=1 and ``--fork``;
neither storescp nor Orthanc fsync what they receive.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom.uid import generate_uid  # noqa: E402

from tests.support.dicom_factory import make_cxr, write  # noqa: E402
from tests.support.listener_peers import dcmtk  # noqa: E402
from tests.support.services import free_port, make_orthanc, port_open  # noqa: E402

AE_TITLE = "CXR_TRIAGE"


@dataclass
class Result:
    target: str
    size: str
    senders: int
    images: int
    megabytes: float
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds


def make_files(directory: Path, n: int, rows: int, cols: int) -> list[Path]:
    """``n`` images in studies of two (a frontal and a lateral view, as chest X-rays come)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    study_uid = ""
    for i in range(n):
        if i % 2 == 0:
            study_uid = generate_uid()
        ds = make_cxr(rows=rows, cols=cols, bits_stored=12, seed=i, instance_number=i + 1,
                      study_uid=study_uid)
        files.append(write(ds, directory / f"{i:04d}.dcm"))
    return files


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if port_open("127.0.0.1", port):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not open port {port}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def node_target(workdir: Path) -> Iterator[int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "--port", str(port), "--bind-address", "127.0.0.1",
         "--data-dir", str(workdir / "node"), "--min-free-mb", "1", "--no-stability",
         "--log-level", "WARNING", "--allowed-callers", "STORESCU"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc, "node")
        yield port
    finally:
        _stop(proc)


@contextmanager
def storescp_target(workdir: Path) -> Iterator[int]:
    port = free_port()
    out = workdir / "storescp"
    out.mkdir(parents=True)
    proc = subprocess.Popen(
        [dcmtk("storescp"), "--fork", "-aet", AE_TITLE, "+xa", "-pdu", "131072", "-od", str(out),
         str(port)],
        env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc, "storescp")
        yield port
    finally:
        _stop(proc)


@contextmanager
def orthanc_target(workdir: Path) -> Iterator[int]:
    orthanc = make_orthanc(workdir / "orthanc", aet=AE_TITLE)
    orthanc.start()
    try:
        yield orthanc.dicom_port
    finally:
        orthanc.stop()


def send(port: int, files: Sequence[Path], senders: int) -> float:
    """Wall time for ``senders`` storescu processes to send ``files`` split between them."""
    groups = [list(files[i::senders]) for i in range(senders)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen([dcmtk("storescu"), "-aet", "STORESCU", "-aec", AE_TITLE, "-R",
                          "127.0.0.1", str(port), *map(str, group)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for group in groups
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


Target = Callable[[Path], "contextmanager[int]"]  # type: ignore[type-arg]


def run(sizes: dict[str, tuple[int, int, int]], targets: dict[str, object], repeats: int,
        scratch: Path) -> list[Result]:
    results: list[Result] = []
    for size, (rows, cols, n) in sizes.items():
        files = make_files(scratch / f"in-{size}", n, rows, cols)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        for senders in (1, 4):
            for name, target in targets.items():
                best = float("inf")
                for r in range(repeats):
                    workdir = scratch / f"{name}-{size}-{senders}-{r}"
                    with target(workdir) as port:  # type: ignore[operator]
                        send(port, files[:2], 1)  # warm-up: imports, first association
                        best = min(best, send(port, files, senders))
                    shutil.rmtree(workdir, ignore_errors=True)
                results.append(Result(name, size, senders, n, megabytes, best))
                print(f"{name:9s} {size:10s} senders={senders} {n / best:8.1f} img/s "
                      f"{megabytes / best:7.1f} MB/s", flush=True)
    return results


def table(results: list[Result]) -> str:
    lines = ["| image | senders | target | images/s | MB/s | node / storescp |",
             "|---|---|---|---|---|---|"]
    for r in results:
        ref = next(x for x in results if (x.size, x.senders, x.target) ==
                   (r.size, r.senders, "storescp"))
        ratio = ref.seconds / r.seconds
        lines.append(f"| {r.size} | {r.senders} | {r.target} | {r.images_per_s:.1f} | "
                     f"{r.mb_per_s:.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=200, help="number of 512x512 images")
    parser.add_argument("--large", type=int, default=24, help="number of 2500x2048 images")
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per cell")
    parser.add_argument("--no-orthanc", action="store_true")
    parser.add_argument("--scratch", type=Path, default=None)
    args = parser.parse_args(argv)
    targets: dict[str, object] = {"node": node_target, "storescp": storescp_target}
    if not args.no_orthanc and shutil.which("Orthanc"):
        targets["orthanc"] = orthanc_target
    sizes = {"512x512": (512, 512, args.small), "2500x2048": (2500, 2048, args.large)}
    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        results = run(sizes, targets, args.repeats, Path(tmp))
    print(f"load average after: {os.getloadavg()}")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
