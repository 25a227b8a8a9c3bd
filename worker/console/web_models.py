"""The models page of the web console (``/models``): every registered model with its
HTML reports and evaluation plots, each found through a database row and served only from
under ``settings.reports_dir``.  Read-only; every value shown is escaped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from db.session import Database
from db.settings import Settings
from worker.console.web_html import esc, prob
from worker.console.web_study import under


def report_pngs(report_path: str | None, reports_dir: Path) -> list[Path]:
    """The PNG plots belonging to a report: the file itself, the PNGs in a report folder,
    or the PNGs beside a non-image report file.  Only paths under ``reports_dir``."""
    if not report_path:
        return []
    p = Path(report_path)
    if p.is_dir():
        found = sorted(p.glob("*.png"))
    elif p.suffix.lower() == ".png":
        found = [p] if p.is_file() else []
    elif p.exists():
        found = sorted(p.parent.glob("*.png"))
    else:
        found = []
    root = reports_dir.resolve()
    return [f for f in found if f.resolve().is_relative_to(root)]


@dataclass
class ModelReports:
    model: dict[str, Any]
    reports: list[str]  # URLs of HTML reports
    plots: list[str]  # URLs of PNG plots


def _report_url(path: Path, root: Path) -> str:
    return "/reports/" + quote(path.resolve().relative_to(root.resolve()).as_posix())


def load_models(db: Database, settings: Settings) -> list[ModelReports]:
    from sqlalchemy import select

    from db.models import Evaluation, ModelVersion, RetrainRun
    from worker.console.status import list_models

    root = settings.reports_dir
    with db.session() as s:
        models = list_models(s)
        rows = s.execute(
            select(ModelVersion.version, Evaluation.report_path)
            .join(Evaluation, Evaluation.model_version_id == ModelVersion.id)
            .order_by(Evaluation.id)).all()
        runs = s.execute(select(RetrainRun.challenger_version, RetrainRun.report_path)
                         .where(RetrainRun.report_path.is_not(None))).all()
    out = {m["version"]: ModelReports(m, [], []) for m in models}
    for version, report in [*rows, *runs]:
        entry = out.get(version or "")
        if entry is None or not report:
            continue
        index = under(report, root)
        if index is not None and index.suffix.lower() == ".html":
            url = _report_url(index, root)
            if url not in entry.reports:
                entry.reports.append(url)
        for png in report_pngs(report, root):
            url = _report_url(png, root)
            if url not in entry.plots:
                entry.plots.append(url)
    return list(out.values())


def render_models(models: list[ModelReports], banner: str) -> str:
    rows, sections = [], []
    for entry in models:
        m = entry.model
        ev = m["last_evaluation"] or {}
        anchor = "model-" + quote(m["version"], safe="")
        links = " ".join(f'<a class="report-link" href="{esc(u)}">report {i + 1}</a>'
                         for i, u in enumerate(entry.reports)) or '<span class="muted">–</span>'
        rows.append(
            f"<tr><td><a href=\"#{esc(anchor)}\">{esc(m['version'])}</a></td>"
            f"<td>{esc(m['stage'])}</td><td>{esc(m['architecture'])}</td>"
            f"<td>{m['threshold']:.3f}</td><td>{prob(ev.get('auc'))}</td>"
            f"<td>{prob(ev.get('sensitivity'))}</td><td>{prob(ev.get('specificity'))}</td>"
            f"<td>{esc(ev.get('n_images', '–'))}</td><td>{links}</td></tr>")
        plots = "".join(f'<a href="{esc(u)}"><img class="plot" alt="evaluation plot" '
                        f'src="{esc(u)}"></a>' for u in entry.plots)
        sections.append(
            f'<section id="{esc(anchor)}"><h2>{esc(m["version"])}</h2>'
            f"<p>{links}</p>"
            + (f'<div class="plot-grid">{plots}</div>' if plots
               else '<p class="muted">No plots.</p>') + "</section>")
    table = "\n".join(rows) or '<tr><td colspan="9">No models registered.</td></tr>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Models · cxr-triage</title><link rel="stylesheet" href="/static/style.css"></head>
<body>
<p><a href="/">← studies</a></p>
<h1>Models</h1>
<div class="banner">{esc(banner)}</div>
<table id="models"><thead><tr><th>Version</th><th>Stage</th><th>Architecture</th>
<th>Threshold</th><th>AUC</th><th>Sensitivity</th><th>Specificity</th><th>n</th>
<th>HTML report</th></tr></thead>
<tbody>
{table}
</tbody></table>
{"".join(sections)}
<footer>Read-only view.</footer>
</body></html>
"""
