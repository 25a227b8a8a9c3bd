"""The ``cxr-triage`` operator command.

Each subcommand is a thin wrapper over a library function.  Pieces owned by other
packages (registry, labels, delivery, listener) are imported inside the subcommand that
uses them, so ``status`` or ``settings`` does not pay for loading torch.

Exit codes: 0 success, 1 the operation failed (rows rejected, study unknown, a check
failed), 2 bad usage (argparse), 3 a component this subcommand needs is not available.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from db.logs import configure_logging
from db.settings import Settings, SettingsError, load_settings
from worker.console.render import fmt_prob, render_status_table

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_MISSING = 3

log = logging.getLogger("cxr_triage.cli")


def _database(settings: Settings) -> Any:
    from db.session import Database

    return Database(settings)


# ----- subcommands --------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from worker.console.status import StatusQuery, collect_status

    db = _database(settings)
    try:
        with db.session() as s:
            data = collect_status(s, StatusQuery(limit=args.limit, state=args.state))
    finally:
        db.dispose()
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        render_status_table(data, sys.stdout)
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from db.migrate import upgrade
    from db.session import make_engine

    if settings.effective_database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    print(f"database at head: {engine.url.render_as_string(hide_password=True)}")
    return EXIT_OK


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from worker.console.status import list_models

    db = _database(settings)
    try:
        with db.session() as s:
            models = list_models(s)
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(models, indent=2, sort_keys=True))
        return EXIT_OK
    if not models:
        print("no models registered; register one with `cxr-triage model register PATH "
              "--promote`, or train one with `cxr-triage up --bootstrap DATA_DIR`")
        return EXIT_OK
    for m in models:
        mark = "*" if m["stage"] == "production" else " "
        ev = m["last_evaluation"]
        ev_text = "-" if ev is None else (
            f"AUC={fmt_prob(ev['auc'])} sens={fmt_prob(ev['sensitivity'])} "
            f"spec={fmt_prob(ev['specificity'])} n={ev['n_images']} ({ev['kind']})")
        print(f"{mark} {m['version']:<28} {m['stage']:<10} {m['architecture']:<20} "
              f"thr={m['threshold']:.3f} {ev_text}")
        if m["not_promoted_reason"]:
            print(f"    not promoted: {m['not_promoted_reason']}")
        if m["approved_by"]:
            print(f"    approved by {m['approved_by']} at {m['approved_at']}")
    return EXIT_OK


def cmd_model_register(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.checkpoint import CheckpointError
    from trainer.registry import RegistryError, promote, register_model

    path = Path(args.path)
    if not path.is_file():
        print(f"error: checkpoint {path} does not exist", file=sys.stderr)
        return EXIT_FAILED
    db = _database(settings)
    try:
        info = register_model(db, path)
        print(f"registered model {info.version} ({info.architecture}, stage {info.stage})")
        if args.promote:
            info = promote(db, info.version)
            print(f"promoted model {info.version} to production")
    except (RegistryError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        db.dispose()
    return EXIT_OK


def cmd_model_approve(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.promotion import approve, approver
    from trainer.registry import RegistryError

    by = args.by or approver()
    db = _database(settings)
    try:
        info = approve(db, args.version, by)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        db.dispose()
    print(f"model {info.version} approved by {by} and promoted to production")
    return EXIT_OK


def cmd_labels_import(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.labels import LabelFileError, import_labels

    path = Path(args.file)
    if not path.is_file():
        print(f"error: label file {path} does not exist", file=sys.stderr)
        return EXIT_FAILED
    db = _database(settings)
    try:
        report = import_labels(db, path,
                               waiting=lambda message: print(message, file=sys.stderr))
    except LabelFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        db.dispose()
    print(f"{path.name}: {report.summary()}")
    for err in report.errors:
        print(f"  rejected {err}", file=sys.stderr)
    if report.failed:
        print(f"error: {report.failed} row(s) of {path} were not imported", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_redeliver(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from db.models import Study
    from worker.delivery import redeliver

    db = _database(settings)
    try:
        with db.session() as s:
            found = s.scalar(select(Study.id).where(Study.study_uid == args.study_uid))
        if found is None:
            print(f"error: no study {args.study_uid}", file=sys.stderr)
            return EXIT_FAILED
        result = redeliver(db, settings, args.study_uid)
    finally:
        db.dispose()
    print(f"redelivery scheduled for {args.study_uid}: {len(result)} object(s)")
    return EXIT_OK


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    public = settings.public_dict()
    if args.json:
        print(json.dumps(public, indent=2, sort_keys=True, default=str))
    else:
        width = max(len(k) for k in public)
        for key, value in public.items():
            print(f"{key:<{width}}  {json.dumps(value, default=str)}")
    return EXIT_OK


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    from worker.console.web import serve_forever
    from worker.console.web_security import WebBindError

    port = settings.web_port if args.port is None else args.port
    try:
        serve_forever(settings, args.host, port)
    except WebBindError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    from worker.console.health import check_health

    only = [c for arg in args.check or [] for c in arg.split(",") if c]
    try:
        report = check_health(settings, only=only or None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from worker.console.up import UpOptions, run_up

    return run_up(settings, UpOptions(
        bootstrap=Path(args.bootstrap) if args.bootstrap else None,
        web=not args.no_web,
        worker=not args.no_worker,
        web_host=args.web_host,
    ))


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from worker.console.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(
        data=Path(args.data) if args.data else None,
        workdir=Path(args.workdir) if args.workdir else None,
        use_orthanc=not args.no_orthanc,
        timeout=args.timeout,
        studies=args.studies,
        model=Path(args.model) if args.model else None,
        keep_pacs=args.keep_pacs,
    ), base=settings)


# ----- parser ---------------------------------------------------------------------------


Handler = Callable[[argparse.Namespace, Settings], int]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxr-triage",
        description="Operate cxr-triage: status, models, labels, delivery and local runs. "
                    "Settings come from CXR_* environment variables and an optional TOML file.",
    )
    p.add_argument("--config", help="TOML settings file (overrides CXR_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(handler=handler)
        return sp

    sp = add("status", cmd_status, "list studies, predictions, deliveries and a summary")
    sp.add_argument("--json", action="store_true", help="one JSON object on stdout")
    sp.add_argument("--limit", type=int, default=200, help="newest N studies (default 200)")
    sp.add_argument("--state", help="only studies in this state")

    dbp = sub.add_parser("db", help="database maintenance")
    dbsub = dbp.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up_p = dbsub.add_parser("upgrade", help="apply database migrations")
    up_p.set_defaults(handler=cmd_db_upgrade)

    mp = sub.add_parser("model", help="register model checkpoints")
    msub = mp.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    reg = msub.add_parser("register", help="register a checkpoint file as a model version")
    reg.add_argument("path", metavar="PATH")
    reg.add_argument("--promote", action="store_true", help="make it the production model")
    reg.set_defaults(handler=cmd_model_register)
    apr = msub.add_parser("approve", help="approve a candidate awaiting approval and promote it "
                          "(CXR_PROMOTION_REQUIRES_APPROVAL=true); records who and when")
    apr.add_argument("version", metavar="VERSION")
    apr.add_argument("--by", help="approver's name (default: the login name)")
    apr.set_defaults(handler=cmd_model_approve)

    sp = add("models", cmd_models, "list model versions, metrics and the production model")
    sp.add_argument("--json", action="store_true")

    lp = sub.add_parser("labels", help="ground truth for the trainer")
    lsub = lp.add_subparsers(dest="labels_command", required=True, metavar="ACTION")
    imp = lsub.add_parser("import", help="import a labels CSV (non-zero exit if rows failed)")
    imp.add_argument("file", metavar="FILE.csv")
    imp.set_defaults(handler=cmd_labels_import)

    sp = add("redeliver", cmd_redeliver, "send a study's results to PACS again")
    sp.add_argument("study_uid", metavar="STUDY_UID")

    sp = add("up", cmd_up, "run listener, worker, scheduler and web page on this machine")
    sp.add_argument("--bootstrap", metavar="DIR",
                    help="train a first model from DIR (e.g. ../shared/data/cxr) if none exists")
    sp.add_argument("--no-web", action="store_true", help="do not serve the web page")
    sp.add_argument("--no-worker", action="store_true", help="do not start a Celery worker")
    sp.add_argument("--web-host", default="127.0.0.1", help="web page bind address")

    sp = add("demo", cmd_demo, "send sample studies through the whole loop to a local PACS")
    sp.add_argument("--data", metavar="DIR", help="real data folder (default ../shared/data/cxr "
                    "when present; synthetic phantoms otherwise)")
    sp.add_argument("--workdir", metavar="DIR", help="keep demo files here (default: temp dir)")
    sp.add_argument("--no-orthanc", action="store_true",
                    help="use the built-in storage SCP even where Orthanc is installed")
    sp.add_argument("--studies", type=int, default=3, help="how many studies to send")
    sp.add_argument("--model", metavar="PATH", help="checkpoint to score with (default: the "
                    "installation's production model, else an untrained network whose "
                    "scores are meaningless)")
    sp.add_argument("--keep-pacs", action="store_true",
                    help="leave the Orthanc it starts running afterwards, to browse results")
    sp.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for results")

    sp = add("web", cmd_web, "serve the read-only operator web page")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=None, help="default: CXR_WEB_PORT")

    sp = add("settings", cmd_settings, "print effective settings (secrets masked)")
    sp.add_argument("--json", action="store_true")

    hp = add("health", cmd_health, "check database, broker, disk, workers, queue age, "
             "production model and the last nightly run; exit 1 when unhealthy")
    hp.add_argument("--check", action="append", metavar="NAME[,NAME]",
                    help="only these checks (e.g. database,broker,disk for a container's "
                         "liveness)")
    return p


def subcommand_names() -> list[str]:
    """Top-level subcommand names, for checks that deployment files run real commands."""
    parser = build_parser()
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    return []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(config_file=Path(args.config) if args.config else None)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level)
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except ModuleNotFoundError as exc:  # a broken installation, not the operator's fault
        print(f"error: {exc.name or exc} is missing from the installation", file=sys.stderr)
        return EXIT_MISSING
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
