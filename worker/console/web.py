"""The operator's read-only web page (stdlib ``http.server``; no CDN, no JavaScript).

Routes: ``/`` the page (``?state=S&page=N`` filter and page the studies);
``/study/<study uid>`` one study for radiologists; ``/models`` the models with their
reports and plots; ``/api/status`` the ``status --json`` object; ``/healthz`` the health
report (200 or 503); ``/metrics`` the gauges for Prometheus;
``/overlay/<prediction id>.png`` the heatmap over the radiograph, as in the SC;
``/heatmap/<prediction id>.png`` a thumbnail rendered from the stored heatmap alone
(``.npy`` float map or ``.png``); ``/reports/<path>`` HTML reports and PNG plots under
``settings.reports_dir``; ``/static/<file>`` the stylesheet.  Nothing here writes.  The
radiologists' pages live in :mod:`worker.console.web_study`.
"""

from __future__ import annotations

import html
import io
import json
import logging
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from db.session import Database
from db.settings import Settings
from db.uids import is_valid_uid
from worker.console import web_security
from worker.console.web_study import (
    MAX_OVERLAY_PX,
    OVERLAY_PX,
    BadQueryError,
    ListQuery,
    count_studies,
    load_models,
    load_study,
    render_list_controls,
    render_models,
    render_overlay_png,
    render_study,
)

log = logging.getLogger(__name__)
REPORT_TYPES = {".png": "image/png", ".html": "text/html; charset=utf-8"}
STATIC_DIR = Path(__file__).parent / "web_static"
THUMBNAIL_PX = 192
NOT_FOR_DIAGNOSIS = (
    "Research software for triage support. Not a diagnostic device: every result must be "
    "read by a qualified radiologist."
)


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


# ----- page ------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _prob(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


@dataclass
class PageData:
    status: dict[str, Any]
    models: list[dict[str, Any]]
    query: ListQuery
    total: int  # studies matching the query's state, all pages


def load_page_data(db: Database, settings: Settings,
                   query: ListQuery | None = None) -> PageData:
    from worker.console.status import StatusQuery, collect_status, list_models

    query = query or ListQuery()
    with db.session() as s:
        status = collect_status(s, StatusQuery(limit=query.page_size, state=query.state,
                                               offset=query.offset))
        models = list_models(s)
    return PageData(status, models, query, count_studies(db, query.state))


def render_page(data: PageData) -> str:
    summ = data.status["summary"]
    counts = "".join(f"<span>{_e(k)}: <b>{v}</b></span>"
                     for k, v in summ["studies_by_state"].items())
    prod = summ["production_model"]
    prod_text = ("<b>no production model</b> — register one with "
                 "<code>cxr-triage model register PATH --promote</code>"
                 if prod is None else f"production model <b>{_e(prod['version'])}</b>")
    held = summ.get("newest_model_not_promoted")
    if held is not None:
        prod_text += (f'</span><span class="not-promoted">newest model '
                      f"<b>{_e(held['version'])}</b> not promoted: "
                      f"{_e(held['not_promoted_reason'] or 'no reason recorded')}")
    rows = []
    for st in data.status["studies"]:
        pred = st["prediction"] or {}
        call = pred.get("positive")
        call_html = ("–" if call is None else
                     '<span class="call-positive">POSITIVE</span>' if call else
                     '<span class="call-negative">negative</span>')
        pcall = pred.get("pneumonia_positive")
        pneu_html = ("–" if pcall is None else
                     '<span class="call-positive">POSITIVE</span>' if pcall else
                     '<span class="call-negative">negative</span>')
        thumbs = "".join(
            f'<img class="heatmap" alt="heatmap {h["prediction_id"]}" '
            f'src="/overlay/{h["prediction_id"]}.png?px={THUMBNAIL_PX}">'
            for h in st["heatmaps"][:3]
        ) or '<span class="muted">–</span>'
        deliveries = "<br>".join(
            f"{_e(d['kind'])} → {_e(d['destination'])}: {_e(d['state'])}"
            + (f" ({d['attempts']}×)" if d["attempts"] else "")
            + (f' <span class="muted">{_e(d["reason"])}</span>' if d["reason"] else "")
            for d in st["deliveries"]
        ) or '<span class="muted">–</span>'
        rows.append(
            f"<tr><td class=\"uid\"><a href=\"/study/{quote(st['study_uid'], safe='')}\">"
            f"{_e(st['study_uid'])}</a></td>"
            f"<td class=\"state-{_e(st['state'])}\">{_e(st['state'])}</td>"
            f"<td>{st['instances']}</td><td>{_e((st['received_at'] or '')[:19])}</td>"
            f"<td>{_prob(pred.get('probability'))}</td><td>{call_html}</td>"
            f"<td>{_prob(pred.get('pneumonia_probability'))}</td><td>{pneu_html}</td>"
            f"<td>{_e(pred.get('model_version') or '–')}</td><td>{thumbs}</td>"
            f"<td>{deliveries}</td><td>{_e(st['reason'] or '')}</td></tr>"
        )
    studies_html = "\n".join(rows) or '<tr><td colspan="12">No studies received yet.</td></tr>'
    model_rows = []
    for m in data.models:
        ev = m["last_evaluation"] or {}
        anchor = "/models#model-" + quote(m["version"], safe="")
        model_rows.append(
            f"<tr><td>{_e(m['version'])}</td><td>{_e(m['stage'])}</td>"
            f"<td>{_e(m['architecture'])}</td><td>{m['threshold']:.3f}</td>"
            f"<td>{_prob(ev.get('auc'))}</td><td>{_prob(ev.get('sensitivity'))}</td>"
            f"<td>{_prob(ev.get('specificity'))}</td><td>{_e(ev.get('n_images', '–'))}</td>"
            f"<td><a href=\"{_e(anchor)}\">report and plots</a></td>"
            f"<td class=\"why\">{_e(m['not_promoted_reason'] or '')}"
            + (f"approved by {_e(m['approved_by'])} at {_e(m['approved_at'])}"
               if m["approved_by"] else "") + "</td></tr>"
        )
    models_html = "\n".join(model_rows) or '<tr><td colspan="10">No models registered.</td></tr>'
    failed = "".join(
        f"<li>{_e(d['study_uid'])} {_e(d['kind'])} → {_e(d['destination'])}: "
        f"{_e(d['reason'])}</li>" for d in summ["failed_deliveries"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="15">
<title>cxr-triage</title><link rel="stylesheet" href="/static/style.css"></head>
<body>
<h1>cxr-triage</h1>
<div class="banner">{_e(NOT_FOR_DIAGNOSIS)}</div>
<div class="summary">{counts}<span>{prod_text}</span></div>
{f'<h2>Failed deliveries</h2><ul>{failed}</ul>' if failed else ''}
<h2>Studies</h2>
{render_list_controls(data.query, len(data.status["studies"]), data.total)}
<table id="studies"><thead><tr><th>Study UID</th><th>State</th><th>Images</th>
<th>Received (UTC)</th><th>COVID-19 probability</th><th>Call</th>
<th>Pneumonia pattern</th><th>Call</th><th>Model</th><th>Heatmap</th>
<th>Delivery</th><th>Reason</th></tr></thead>
<tbody>
{studies_html}
</tbody></table>
<h2>Models</h2>
<p><a href="/models">Models, HTML reports and evaluation plots →</a></p>
<table id="models"><thead><tr><th>Version</th><th>Stage</th><th>Architecture</th>
<th>Threshold</th><th>AUC</th><th>Sensitivity</th><th>Specificity</th><th>n</th>
<th>Evaluation</th><th>Why not in production</th></tr></thead>
<tbody>
{models_html}
</tbody></table>
<footer>Read-only view. JSON: <a href="/api/status">/api/status</a> ·
health: <a href="/healthz">/healthz</a></footer>
</body></html>
"""


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
