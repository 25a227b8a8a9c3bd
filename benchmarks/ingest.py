"""Ingest benchmark: DCMTK storescu into the node, into DCMTK storescp, and into Orthanc.

Run from the repository root: ``python benchmarks/ingest.py`` (not part of CI).  Sends the
same synthetic 16-bit images (512x512 and 2500x2048) over loopback with 1, 4 and 8 parallel
``storescu`` senders, and prints Markdown tables: images/s per target with the node's ratios
to storescp and Orthanc, and per target the CPU per image and the per-store latency
(p50/p99, from storescu's own timestamped log: request sent to response received).

The node runs as ``python -m dicom_node`` with full durability (fsync of file and directory,
database commit with SQLite synchronous=FULL or PostgreSQL's default fsync), once on SQLite
("node") and once on a fresh PostgreSQL database ("node-pg").  storescp runs with
TCP_NODELAY=1 and ``--fork``; neither storescp nor Orthanc fsync what they receive.
``--profile DIR`` runs the node under ``py-spy record`` and writes one collapsed-stack file
per cell.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom.uid import generate_uid  # noqa: E402

from tests.support.dicom_factory import make_cxr, write  # noqa: E402
from tests.support.listener_peers import dcmtk  # noqa: E402
from tests.support.services import (  # noqa: E402
    candidate_port,
    fresh_postgres_database,
    make_orthanc,
    port_open,
    postgres_reachable,
)

AE_TITLE = "CXR_TRIAGE"
#: storescu's log with a microsecond timestamp per line, to time each store from outside.
_LOG_CONFIG = """log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s %Q} %m%n
"""


@dataclass
class Result:
    target: str
    size: str
    senders: int
    images: int
    megabytes: float
    seconds: float
    #: CPU seconds of the target's processes during the timed send (node targets only).
    cpu_seconds: float | None = None
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def cpu_ms_per_image(self) -> float | None:
        return None if self.cpu_seconds is None else 1000 * self.cpu_seconds / self.images

    def latency(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

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


@dataclass
class Target:
    port: int
    pids: list[int]  # processes whose CPU time is counted (empty: not measured)


def _tree_cpu(pids: Sequence[int]) -> float:
    """User+system CPU seconds of ``pids``, their live descendants and reaped children."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        stats[pid] = fields
    wanted = set(pids)
    grew = True
    while grew:
        extra = {pid for pid, ppid in parents.items() if ppid in wanted and pid not in wanted}
        wanted |= extra
        grew = bool(extra)
    total = 0
    for pid in wanted:
        fields = stats.get(pid)
        if fields is not None:  # utime, stime, cutime, cstime
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / ticks


@contextmanager
def node_target(workdir: Path, database_url: str | None = None,
                processes: int | None = None, root: Path = ROOT) -> Iterator[Target]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    if processes is not None:
        env["CXR_LISTENER_PROCESSES"] = str(processes)
    cmd = [sys.executable, "-m", "dicom_node", "--port", "0", "--bind-address",
           "127.0.0.1", "--data-dir", str(workdir / "node"), "--min-free-mb", "1",
           "--no-stability", "--log-level", "WARNING", "--allowed-callers", "STORESCU"]
    if database_url is not None:
        cmd += ["--database-url", database_url]
    env["PYTHONPATH"] = str(root)
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, text=True)
    try:
        # "LISTENING" comes once every listener process accepts (an open port only says
        # that the first does; the others' start-up would be timed with the sends).
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("LISTENING port="):
            raise RuntimeError(f"node did not start: {line!r}")
        port = int(line.strip().split("=", 1)[1])  # port 0: the kernel chose it
        _wait_port(port, proc, "node")
        yield Target(port, [proc.pid])
    finally:
        _stop(proc)


@contextmanager
def node_pg_target(workdir: Path, processes: int | None = None) -> Iterator[Target]:
    with fresh_postgres_database() as url, node_target(workdir, url, processes) as target:
        yield target


@contextmanager
def py_spy(pid: int, output: Path | None) -> Iterator[None]:
    """Sample ``pid`` and its children with py-spy while the block runs (no-op: None)."""
    if output is None:
        yield
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--subprocesses",
                             "--threads", "--rate", "100", "--format", "raw", "--output",
                             str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the timed part starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        proc.wait(timeout=60)


@contextmanager
def storescp_target(workdir: Path) -> Iterator[Target]:
    port = candidate_port()  # storescp cannot take port 0
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
        yield Target(port, [])
    finally:
        _stop(proc)


@contextmanager
def orthanc_target(workdir: Path) -> Iterator[Target]:
    orthanc = make_orthanc(workdir / "orthanc", aet=AE_TITLE)
    orthanc.start()
    try:
        yield Target(orthanc.dicom_port, [])
    finally:
        orthanc.stop()


def _store_latencies(log: str) -> list[float]:
    """Milliseconds from "Sending Store Request" to the next "Received Store Response"."""
    latencies: list[float] = []
    sent: float | None = None
    for line in log.splitlines():
        parts = line.split(" ", 2)
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        stamp = int(parts[0]) + float(parts[1].replace(".", "")) / 1e6
        if parts[2].startswith("Sending Store Request"):
            sent = stamp
        elif parts[2].startswith("Received Store Response") and sent is not None:
            latencies.append(1000 * (stamp - sent))
            sent = None
    return latencies


def send(port: int, files: Sequence[Path], senders: int,
         log_config: Path | None = None) -> tuple[float, list[float]]:
    """Wall time for ``senders`` storescu processes to send ``files`` split between them,
    and the per-store latencies in ms (when ``log_config`` is given)."""
    groups = [list(files[i::senders]) for i in range(senders)]
    logging = ["-lc", str(log_config)] if log_config is not None else []
    start = time.perf_counter()
    procs = [
        subprocess.Popen([dcmtk("storescu"), *logging, "-aet", "STORESCU", "-aec", AE_TITLE,
                          "-R", "127.0.0.1", str(port), *map(str, group)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for group in groups
    ]
    latencies: list[float] = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {(out + err).decode()[-500:]}")
        latencies += _store_latencies((out + err).decode(errors="replace"))
    elapsed = time.perf_counter() - start
    if log_config is not None and len(latencies) != len(files):
        raise RuntimeError(f"{len(latencies)} store responses logged for {len(files)} files")
    return elapsed, latencies


def run(sizes: dict[str, tuple[int, int, int]], targets: dict[str, object],
        senders_list: Sequence[int], repeats: int, scratch: Path,
        profile: Path | None = None) -> list[Result]:
    log_config = scratch / "storescu-log.cfg"
    log_config.write_text(_LOG_CONFIG)
    results: list[Result] = []
    for size, (rows, cols, n) in sizes.items():
        files = make_files(scratch / f"in-{size}", n, rows, cols)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        for senders in senders_list:
            for name, target in targets.items():
                best: Result | None = None
                for r in range(repeats):
                    workdir = scratch / f"{name}-{size}-{senders}-{r}"
                    spy = None
                    if profile is not None and name.startswith("node"):
                        spy = profile / f"{name}-{size}-{senders}-{r}.txt"
                    with target(workdir) as tgt:  # type: ignore[operator]
                        send(tgt.port, files[:2], 1)  # warm-up: imports, first association
                        cpu_before = _tree_cpu(tgt.pids) if tgt.pids else 0.0
                        with py_spy(tgt.pids[0] if tgt.pids else 0, spy):
                            seconds, latencies = send(tgt.port, files, senders, log_config)
                        cpu = _tree_cpu(tgt.pids) - cpu_before if tgt.pids else None
                    shutil.rmtree(workdir, ignore_errors=True)
                    result = Result(name, size, senders, n, megabytes, seconds, cpu, latencies)
                    if best is None or result.seconds < best.seconds:
                        best = result
                assert best is not None
                results.append(best)
                cpu_text = (f" cpu {best.cpu_ms_per_image:6.1f} ms/img"
                            if best.cpu_ms_per_image is not None else "")
                print(f"{name:9s} {size:10s} senders={senders} {best.images_per_s:8.1f} img/s "
                      f"{best.mb_per_s:7.1f} MB/s p50 {best.latency(0.5):7.1f} ms "
                      f"p99 {best.latency(0.99):7.1f} ms{cpu_text}", flush=True)
    return results


def _find(results: list[Result], r: Result, target: str) -> Result | None:
    return next((x for x in results if (x.size, x.senders, x.target) ==
                 (r.size, r.senders, target)), None)


def table(results: list[Result]) -> str:
    """Throughput per cell with the node's ratios to storescp and to Orthanc."""
    names = list(dict.fromkeys(r.target for r in results))
    nodes = [n for n in names if n.startswith("node")]
    header = ["image", "senders", *(f"{n} img/s" for n in names)]
    for node in nodes:
        header += [f"{node} / storescp", f"{node} / orthanc"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        if r.target != names[0]:
            continue
        row = [r.size, str(r.senders)]
        for name in names:
            cell = _find(results, r, name)
            row.append(f"{cell.images_per_s:.1f}" if cell else "")
        for node in nodes:
            cell = _find(results, r, node)
            for ref_name in ("storescp", "orthanc"):
                ref = _find(results, r, ref_name)
                row.append(f"{ref.seconds / cell.seconds:.2f}" if cell and ref else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def detail_table(results: list[Result]) -> str:
    """Per target: MB/s, CPU per image and per-store latency."""
    lines = ["| image | senders | target | images/s | MB/s | CPU ms/image | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cpu = f"{r.cpu_ms_per_image:.1f}" if r.cpu_ms_per_image is not None else ""
        lines.append(f"| {r.size} | {r.senders} | {r.target} | {r.images_per_s:.1f} | "
                     f"{r.mb_per_s:.1f} | {cpu} | {r.latency(0.5):.1f} | "
                     f"{r.latency(0.99):.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=200, help="number of 512x512 images")
    parser.add_argument("--large", type=int, default=24, help="number of 2500x2048 images")
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per cell")
    parser.add_argument("--senders", default="1,4,8", help="comma-separated sender counts")
    parser.add_argument("--targets", default="node,node-pg,storescp,orthanc",
                        help="comma-separated subset of node,node-pg,node-before,"
                        "storescp,orthanc")
    parser.add_argument("--processes", type=int, default=min(4, os.cpu_count() or 1),
                        help="CXR_LISTENER_PROCESSES for node and node-pg (default: the "
                        "number of cores, at most 4)")
    parser.add_argument("--before", type=Path, default=None,
                        help="another checkout of the node (e.g. `git archive` of the base "
                        "commit), measured as target node-before on SQLite, one process")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the node with py-spy into this directory")
    parser.add_argument("--no-orthanc", action="store_true")
    parser.add_argument("--scratch", type=Path, default=None)
    args = parser.parse_args(argv)
    available: dict[str, object] = {
        "node": lambda w, **kw: node_target(w, None, args.processes, **kw),
        "node-pg": lambda w, **kw: node_pg_target(w, args.processes, **kw),
        "storescp": storescp_target,
        "orthanc": orthanc_target,
    }
    if args.before is not None:
        available["node-before"] = lambda w, **kw: node_target(w, None, None,
                                                               args.before.resolve())
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.no_orthanc or not shutil.which("Orthanc"):
        wanted = [t for t in wanted if t != "orthanc"]
    if "node-pg" in wanted and not postgres_reachable():
        print("PostgreSQL is not reachable at 127.0.0.1:5432: no node-pg column", flush=True)
        wanted.remove("node-pg")
    targets = {name: available[name] for name in wanted}
    senders = [int(x) for x in args.senders.split(",")]
    sizes = {"512x512": (512, 512, args.small), "2500x2048": (2500, 2048, args.large)}
    sizes = {k: v for k, v in sizes.items() if v[2] > 0}
    print(f"load average before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        results = run(sizes, targets, senders, args.repeats, Path(tmp), args.profile)
    print(f"load average after: {os.getloadavg()}")
    print(table(results))
    print()
    print(detail_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
