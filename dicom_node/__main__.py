"""``python -m dicom_node``: run the C-STORE listener and its stability loop until signalled."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from db.logs import LINE, LINE_WITH_PID, configure_logging
from db.settings import SettingsError, load_settings


def _setup_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dicom_node",
        description="cxr-triage DICOM listener: receives studies by C-STORE, stores them "
        "durably and queues quiet studies for analysis. Flags override CXR_* settings.",
    )
    parser.add_argument("--config", type=Path, help="TOML config file (else CXR_CONFIG)")
    parser.add_argument("--port", type=int, help="port to listen on (0: any free port)")
    parser.add_argument("--bind-address", help="address to bind")
    parser.add_argument("--ae-title", help="our AE title (the called AE title peers must use)")
    parser.add_argument("--allowed-callers", help="comma-separated calling AE titles allowed")
    parser.add_argument("--data-dir", type=Path, help="data directory (spool, embedded broker)")
    parser.add_argument("--database-url", help="SQLAlchemy database URL")
    parser.add_argument("--broker-url", help="Celery broker URL")
    parser.add_argument("--inference-queue", help="queue that receives analysis tasks")
    parser.add_argument("--stable-seconds", type=float, help="quiet time before a study is queued")
    parser.add_argument("--scheduler-interval", type=float, help="seconds between stability passes")
    parser.add_argument("--max-associations", type=int, help="concurrent associations")
    parser.add_argument("--max-pdu", type=int, help="maximum PDU size we receive")
    parser.add_argument("--min-free-mb", type=int, help="refuse stores below this free space")
    parser.add_argument("--network-timeout", type=float,
                        help="seconds a PDU read or an idle association may take")
    parser.add_argument("--acse-timeout", type=float, help="seconds for association set-up")
    parser.add_argument("--dimse-timeout", type=float, help="seconds for a DIMSE message")
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--tls-ca", type=Path,
                        help="CA bundle; when set, client certs are required")
    parser.add_argument("--no-stability", action="store_true",
                        help="do not run the stability loop in this process")
    parser.add_argument("--listener-processes", type=int,
                        help="listener processes on the port, under one supervisor")
    parser.add_argument("--listener-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("port", "bind_address", "ae_title", "allowed_callers", "data_dir", "database_url",
             "broker_url", "inference_queue", "stable_seconds", "scheduler_interval",
             "max_associations", "max_pdu", "min_free_mb", "tls_cert", "tls_key", "tls_ca",
             "log_level", "network_timeout", "acse_timeout", "dimse_timeout",
             "listener_processes")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = _setup_argparser().parse_args(argv)
    try:
        settings = load_settings(config_file=args.config, overrides=_overrides(args))
    except SettingsError as exc:
        print(f"configuration error: {exc}")
        return 2
    configure_logging(
        settings.log_level,
        # Several listener processes share one log: each line names its process.
        LINE if settings.listener_processes == 1 else LINE_WITH_PID,
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    from dicom_node.listener import start_node

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger("dicom_node").info("signal %d received, stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if settings.listener_processes > 1 and not args.listener_child:
        from dicom_node.supervisor import run_supervisor

        return run_supervisor(settings, list(sys.argv[1:] if argv is None else argv),
                              run_stability=not args.no_stability, stop=stop)
    if args.listener_child:
        from dicom_node.supervisor import die_with_parent

        die_with_parent()
    node = start_node(settings, run_stability=not args.no_stability,
                      supervised=args.listener_child)
    from db import metrics

    if not args.listener_child:  # a supervisor serves the metrics of all its children
        metrics.serve(settings.metrics_port)
    # A machine-readable line so that supervisors and tests learn an ephemeral port.
    print(f"LISTENING port={node.port}", flush=True)
    try:
        stop.wait()
    finally:
        node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
