"""The operator's read-only web page (stdlib ``http.server``; no CDN, no JavaScript).

Routes: ``/`` the page (``?state=S&page=N`` filter and page the studies);
``/study/<study uid>`` one study for radiologists; ``/models`` the models with their
reports and plots; ``/api/status`` the ``status --json`` object; ``/healthz`` the health
report (200 or 503); ``/metrics`` the gauges for Prometheus;
``/overlay/<prediction id>.png`` the heatmap over the radiograph, as in the SC;
``/heatmap/<prediction id>.png`` a thumbnail rendered from the stored heatmap alone
(``.npy`` float map or ``.png``); ``/reports/<path>`` HTML reports and PNG plots under
``settings.reports_dir``; ``/static/<file>`` the stylesheet.  Nothing here writes.  The
pages are drawn in :mod:`worker.console.web_home` (the front page),
:mod:`worker.console.web_study` (one study, for radiologists) and
:mod:`worker.console.web_models` (the models).
"""

from __future__ import annotations

import io
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from db.session import Database
from db.settings import Settings
from db.uids import is_valid_uid
from worker.console import web_security
from worker.console.web_home import (
    NOT_FOR_DIAGNOSIS,
    THUMBNAIL_PX,
    load_page_data,
    render_page,
)
from worker.console.web_models import load_models, render_models
from worker.console.web_study import (
    MAX_OVERLAY_PX,
    OVERLAY_PX,
    BadQueryError,
    ListQuery,
    load_study,
    render_overlay_png,
    render_study,
)

log = logging.getLogger(__name__)
REPORT_TYPES = {".png": "image/png", ".html": "text/html; charset=utf-8"}
STATIC_DIR = Path(__file__).parent / "web_static"


# ----- images ----------------------------------------------------------------------------


def render_heatmap_png(path: Path, size: int = THUMBNAIL_PX) -> bytes:
    """A colour PNG thumbnail of a stored heatmap (.npy float map, or an existing PNG)."""
    import numpy as np
    from PIL import Image

    img: Image.Image
    if path.suffix.lower() == ".png":
        img = Image.open(path)
        img.thumbnail((size, size))
    else:
        import matplotlib

        arr = np.load(path, allow_pickle=False).astype(np.float32)
        arr = np.squeeze(arr)
        if arr.ndim != 2:
            raise ValueError(f"heatmap {path.name} has shape {arr.shape}, expected 2-D")
        arr = np.nan_to_num(arr)
        lo, hi = float(arr.min()), float(arr.max())
        norm = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        rgba = matplotlib.colormaps["inferno"](norm, bytes=True)
        img = Image.fromarray(np.ascontiguousarray(rgba[..., :3]), mode="RGB")
        img.thumbnail((size, size))
        if max(img.size) < size:  # small maps are enlarged for legibility
            scale = size / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----- server ----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: WebServer
    server_version = "cxr-triage-web"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        log.debug("web %s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self) -> None:
        for name, value in web_security.SECURITY_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def _unauthorised(self) -> None:
        body = b"authentication required\n"
        self.send_response(HTTPStatus.UNAUTHORIZED)
        self.send_header("WWW-Authenticate", web_security.challenge(self.server.settings))
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self, what: str) -> None:
        self._send(HTTPStatus.NOT_FOUND, f"not found: {what}\n".encode(), "text/plain")

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = unquote(urlsplit(self.path).path)
        app = self.server
        if not web_security.authorised(self.headers.get("Authorization"), app.settings,
                                         path):
            return self._unauthorised()
        try:
            if path in ("/", "/index.html"):
                try:
                    query = ListQuery.parse(parse_qs(urlsplit(self.path).query))
                except BadQueryError as exc:
                    return self._send(HTTPStatus.BAD_REQUEST, f"{exc}\n".encode(),
                                      "text/plain")
                page = render_page(load_page_data(app.db, app.settings, query))
                self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
            elif path.startswith("/study/"):
                self._study(path[len("/study/"):])
            elif path == "/models":
                page = render_models(load_models(app.db, app.settings), NOT_FOR_DIAGNOSIS)
                self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
            elif path.startswith("/overlay/") and path.endswith(".png"):
                self._overlay(path[len("/overlay/"):-len(".png")])
            elif path == "/api/status":
                from worker.console.status import collect_status

                with app.db.session() as s:
                    body = json.dumps(collect_status(s), sort_keys=True).encode()
                self._send(HTTPStatus.OK, body, "application/json")
            elif path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                self._send(HTTPStatus.OK, generate_latest(app.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                from worker.console.health import check_health

                params = parse_qs(urlsplit(self.path).query)
                only = [c for v in params.get("check", []) for c in v.split(",") if c]
                try:
                    report = check_health(app.settings, app.db, only=only or None)
                except ValueError as exc:
                    return self._send(HTTPStatus.BAD_REQUEST, f"{exc}\n".encode(),
                                      "text/plain")
                status = HTTPStatus.OK if report.ok else HTTPStatus.SERVICE_UNAVAILABLE
                self._send(status, json.dumps(report.as_dict()).encode(), "application/json")
            elif path.startswith("/heatmap/") and path.endswith(".png"):
                self._heatmap(path[len("/heatmap/"):-len(".png")])
            elif path.startswith("/reports/"):
                self._report(path[len("/reports/"):])
            elif path.startswith("/static/"):
                self._static(path[len("/static/"):])
            else:
                self._not_found(path)
        except BrokenPipeError:
            pass
        except Exception as exc:  # noqa: BLE001 - one failed request must not kill the server
            log.exception("web request failed path=%s", path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR,
                       f"error: {type(exc).__name__}\n".encode(), "text/plain")

    def _heatmap(self, ident: str) -> None:
        from db.models import Prediction

        pred_id = web_security.parse_id(ident)
        if pred_id is None:
            return self._not_found("heatmap")
        with self.server.db.session() as s:
            pred = s.get(Prediction, pred_id)
            stored = pred.heatmap_path if pred is not None else None
        if not stored or not Path(stored).is_file():
            return self._not_found("heatmap")
        self._send(HTTPStatus.OK, render_heatmap_png(Path(stored)), "image/png")

    def _study(self, study_uid: str) -> None:
        if not is_valid_uid(study_uid):
            return self._not_found("study")
        view = load_study(self.server.db, self.server.settings, study_uid)
        if view is None:
            return self._not_found("study")
        page = render_study(view, NOT_FOR_DIAGNOSIS)
        self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")

    def _overlay(self, ident: str) -> None:
        query = parse_qs(urlsplit(self.path).query)
        px = (query.get("px") or [str(OVERLAY_PX)])[-1]
        pred_id, size = web_security.parse_id(ident), web_security.parse_id(px)
        if pred_id is None or size is None or not 32 <= size <= MAX_OVERLAY_PX:
            return self._not_found("overlay")
        png = render_overlay_png(self.server.db, self.server.settings, pred_id, size)
        if png is None:
            return self._not_found("overlay")
        self._send(HTTPStatus.OK, png, "image/png")

    def _report(self, rel: str) -> None:
        root = self.server.settings.reports_dir.resolve()
        target = (root / rel).resolve()
        ctype = REPORT_TYPES.get(target.suffix.lower())
        if not target.is_relative_to(root) or ctype is None or not target.is_file():
            return self._not_found("report")
        self._send(HTTPStatus.OK, target.read_bytes(), ctype)

    def _static(self, name: str) -> None:
        target = (STATIC_DIR / name).resolve()
        if not target.is_relative_to(STATIC_DIR.resolve()) or not target.is_file():
            return self._not_found("static")
        ctype = "text/css" if target.suffix == ".css" else "application/octet-stream"
        self._send(HTTPStatus.OK, target.read_bytes(), ctype)


class WebServer(ThreadingHTTPServer):
    """The page's HTTP server, holding one database handle for all requests."""

    daemon_threads = True

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry

        from worker.metrics import BrokerCollector, DatabaseCollector

        web_security.check_bind(host, settings)
        self.settings = settings
        self.db = Database(settings)
        # The database gauges, scraped here once per installation (README, "Monitoring").
        self.registry = CollectorRegistry()
        self.registry.register(DatabaseCollector(self.db))
        self.registry.register(BrokerCollector(settings))
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.db.dispose()


def start_web(settings: Settings, host: str = "127.0.0.1", port: int = 0) -> WebServer:
    """Serve in a daemon thread (tests, ``up``); ``close()`` stops it."""
    server = WebServer(settings, host, port)
    threading.Thread(target=server.serve_forever, name="cxr-web", daemon=True).start()
    log.info("web page listening host=%s port=%d", host, server.port)
    return server


def serve_forever(settings: Settings, host: str, port: int) -> None:
    """``cxr-triage web``: serve until interrupted."""
    import signal

    def _stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    server = WebServer(settings, host, port)
    log.info("web page listening host=%s port=%d", host, server.port)
    print(f"cxr-triage web page on http://{host}:{server.port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.db.dispose()
