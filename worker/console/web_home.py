"""The front page of the web console (``/``): the summary, the study list (filtered and
paged by :class:`worker.console.web_study.ListQuery`) and the models table.  Read-only;
every value shown is escaped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from db.session import Database
from db.settings import Settings
from worker.console.web_html import call, esc, prob
from worker.console.web_study import ListQuery, count_studies, render_list_controls

THUMBNAIL_PX = 192
NOT_FOR_DIAGNOSIS = (
    "Research software for triage support. Not a diagnostic device: every result must be "
    "read by a qualified radiologist."
)




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
    counts = "".join(f"<span>{esc(k)}: <b>{v}</b></span>"
                     for k, v in summ["studies_by_state"].items())
    prod = summ["production_model"]
    prod_text = ("<b>no production model</b> — register one with "
                 "<code>cxr-triage model register PATH --promote</code>"
                 if prod is None else f"production model <b>{esc(prod['version'])}</b>")
    held = summ.get("newest_model_not_promoted")
    if held is not None:
        prod_text += (f'</span><span class="not-promoted">newest model '
                      f"<b>{esc(held['version'])}</b> not promoted: "
                      f"{esc(held['not_promoted_reason'] or 'no reason recorded')}")
    rows = []
    for st in data.status["studies"]:
        pred = st["prediction"] or {}
        call_html = call(pred.get("positive"))
        pneu_html = call(pred.get("pneumonia_positive"))
        thumbs = "".join(
            f'<img class="heatmap" alt="heatmap {h["prediction_id"]}" '
            f'src="/overlay/{h["prediction_id"]}.png?px={THUMBNAIL_PX}">'
            for h in st["heatmaps"][:3]
        ) or '<span class="muted">–</span>'
        deliveries = "<br>".join(
            f"{esc(d['kind'])} → {esc(d['destination'])}: {esc(d['state'])}"
            + (f" ({d['attempts']}×)" if d["attempts"] else "")
            + (f' <span class="muted">{esc(d["reason"])}</span>' if d["reason"] else "")
            for d in st["deliveries"]
        ) or '<span class="muted">–</span>'
        rows.append(
            f"<tr><td class=\"uid\"><a href=\"/study/{quote(st['study_uid'], safe='')}\">"
            f"{esc(st['study_uid'])}</a></td>"
            f"<td class=\"state-{esc(st['state'])}\">{esc(st['state'])}</td>"
            f"<td>{st['instances']}</td><td>{esc((st['received_at'] or '')[:19])}</td>"
            f"<td>{prob(pred.get('probability'))}</td><td>{call_html}</td>"
            f"<td>{prob(pred.get('pneumonia_probability'))}</td><td>{pneu_html}</td>"
            f"<td>{esc(pred.get('model_version') or '–')}</td><td>{thumbs}</td>"
            f"<td>{deliveries}</td><td>{esc(st['reason'] or '')}</td></tr>"
        )
    studies_html = "\n".join(rows) or '<tr><td colspan="12">No studies received yet.</td></tr>'
    model_rows = []
    for m in data.models:
        ev = m["last_evaluation"] or {}
        anchor = "/models#model-" + quote(m["version"], safe="")
        model_rows.append(
            f"<tr><td>{esc(m['version'])}</td><td>{esc(m['stage'])}</td>"
            f"<td>{esc(m['architecture'])}</td><td>{m['threshold']:.3f}</td>"
            f"<td>{prob(ev.get('auc'))}</td><td>{prob(ev.get('sensitivity'))}</td>"
            f"<td>{prob(ev.get('specificity'))}</td><td>{esc(ev.get('n_images', '–'))}</td>"
            f"<td><a href=\"{esc(anchor)}\">report and plots</a></td>"
            f"<td class=\"why\">{esc(m['not_promoted_reason'] or '')}"
            + (f"approved by {esc(m['approved_by'])} at {esc(m['approved_at'])}"
               if m["approved_by"] else "") + "</td></tr>"
        )
    models_html = "\n".join(model_rows) or '<tr><td colspan="10">No models registered.</td></tr>'
    failed = "".join(
        f"<li>{esc(d['study_uid'])} {esc(d['kind'])} → {esc(d['destination'])}: "
        f"{esc(d['reason'])}</li>" for d in summ["failed_deliveries"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="15">
<title>cxr-triage</title><link rel="stylesheet" href="/static/style.css"></head>
<body>
<h1>cxr-triage</h1>
<div class="banner">{esc(NOT_FOR_DIAGNOSIS)}</div>
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
