"""The radiologists' pages of the web console: one study, the study list's filter and
paging, and the heatmap drawn over the radiograph.

Read-only.  Every value shown is escaped; every file served is found through a database
row and must lie under its own folder of the data dir (spool, heatmaps, reports), never a
path taken from a request.  Patient names and IDs are never shown; the accession number
is, since it is how a radiologist finds the study in the PACS.

Routes (wired in :mod:`worker.console.web`):

- ``/study/<study uid>``: :func:`load_study` + :func:`render_study`;
- ``/overlay/<prediction id>.png[?px=N]``: :func:`render_overlay_png`, the heatmap over
  the radiograph as in the Secondary Capture (same blend, :func:`dicom_node.burnin.overlay`);
- ``/?state=S&page=N``: :class:`ListQuery` (the list itself is in
  :mod:`worker.console.web_home`; the models page in :mod:`worker.console.web_models`).
"""

from __future__ import annotations

import io
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from db.models import StudyState
from db.session import Database
from db.settings import Settings
from worker.console.web_html import call, esc, prob

PAGE_SIZE = 50
OVERLAY_PX = 768  # long side of the overlay on the study page
MAX_OVERLAY_PX = 1024





def under(path: str | Path | None, root: Path) -> Path | None:
    """``path`` resolved, when it is an existing file under ``root``; else None."""
    if not path:
        return None
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root.resolve()) or not resolved.is_file():
        return None
    return resolved


# ----- the list's filter and paging ---------------------------------------------------------


class BadQueryError(ValueError):
    """A request parameter out of range: the caller's fault (HTTP 400)."""


@dataclass(frozen=True)
class ListQuery:
    state: str | None = None
    page: int = 1
    page_size: int = PAGE_SIZE

    @classmethod
    def parse(cls, query: dict[str, list[str]]) -> ListQuery:
        state = (query.get("state") or [""])[-1] or None
        if state is not None and state not in {s.value for s in StudyState}:
            raise BadQueryError(f"unknown state {state!r}")
        raw_page = (query.get("page") or ["1"])[-1]
        if not raw_page.isdigit() or not 1 <= int(raw_page) <= 100_000:
            raise BadQueryError(f"page {raw_page!r} must be a whole number from 1")
        return cls(state, int(raw_page))

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.page_size

    def url(self, **changes: Any) -> str:
        values = {"state": self.state, "page": self.page, **changes}
        params = {k: v for k, v in values.items() if v and not (k == "page" and v == 1)}
        return "/" + (f"?{urlencode(params)}" if params else "")


def render_list_controls(query: ListQuery, shown: int, total: int) -> str:
    """State filter links and previous/next links for the study list."""
    states = [("all", None), *((s.value, s.value) for s in StudyState)]
    links = " ".join(
        f'<a class="filter{" active" if query.state == value else ""}" '
        f'href="{esc(query.url(state=value, page=1))}">{esc(name)}</a>'
        for name, value in states)
    first = query.offset + 1 if shown else 0
    nav = [f'<span class="muted">{first}–{query.offset + shown} of {total}</span>']
    if query.page > 1:
        nav.insert(0, f'<a rel="prev" href="{esc(query.url(page=query.page - 1))}">'
                      "← newer</a>")
    if query.offset + shown < total:
        nav.append(f'<a rel="next" href="{esc(query.url(page=query.page + 1))}">older →</a>')
    return (f'<nav class="filters">State: {links}</nav>'
            f'<nav class="pages">{" ".join(nav)}</nav>')


def count_studies(db: Database, state: str | None) -> int:
    from sqlalchemy import func, select

    from db.models import Study

    stmt = select(func.count()).select_from(Study)
    if state:
        stmt = stmt.where(Study.state == state)
    with db.session() as s:
        return int(s.scalar(stmt) or 0)


# ----- one study ------------------------------------------------------------------------------


@dataclass
class StudyImage:
    sop_instance_uid: str
    modality: str | None
    view_position: str | None
    prediction_id: int | None = None
    scored: bool = False
    probability: float | None = None
    skip_reason: str | None = None
    has_heatmap: bool = False
    has_radiograph: bool = False


@dataclass
class StudyView:
    study_uid: str
    accession_number: str | None
    state: str
    reason: str | None
    received_at: str | None
    analysis: dict[str, Any] | None
    images: list[StudyImage] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    viewer_url: str | None = None


def viewer_url(template: str, study_uid: str, accession_number: str | None) -> str | None:
    """The PACS viewer link from ``settings.viewer_url_template`` (validated at load), its
    placeholders filled URL-encoded."""
    if not template:
        return None
    values = {"study_uid": quote(study_uid, safe=""),
              "accession_number": quote(accession_number or "", safe="")}
    return string.Formatter().vformat(template, (), values)


def load_study(db: Database, settings: Settings, study_uid: str) -> StudyView | None:
    from sqlalchemy import select

    from db.models import Delivery, Instance, Prediction, Study, as_utc
    from worker.console.status import _latest_analyses, delivery_dict, prediction_dict

    with db.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).first()
        if study is None:
            return None
        analysis = _latest_analyses(s, [study.id]).get(study.id)
        preds = {p.instance_id: p for p in s.scalars(
            select(Prediction).where(Prediction.analysis_id == analysis.id))} \
            if analysis is not None else {}
        images = []
        for inst in s.scalars(select(Instance).where(Instance.study_id == study.id)
                              .order_by(Instance.id)):
            p = preds.get(inst.id)
            images.append(StudyImage(
                inst.sop_instance_uid, inst.modality, inst.view_position,
                prediction_id=p.id if p is not None else None,
                scored=bool(p is not None and p.scored),
                probability=p.probability if p is not None else None,
                skip_reason=(p.skip_reason if p is not None else
                             "not analysed" if analysis is not None else None),
                has_heatmap=under(p.heatmap_path if p else None, settings.heatmaps_dir)
                is not None,
                has_radiograph=under(inst.path, settings.spool_dir) is not None,
            ))
        deliveries = [delivery_dict(d) for d in s.scalars(
            select(Delivery).where(Delivery.study_id == study.id).order_by(Delivery.id))]
        received = as_utc(study.received_at)
        return StudyView(
            study.study_uid, study.accession_number, study.state, study.reason,
            received.isoformat() if received else None, prediction_dict(analysis),
            images, deliveries,
            viewer_url(settings.viewer_url_template, study.study_uid,
                       study.accession_number))


def render_study(view: StudyView, banner: str) -> str:
    a = view.analysis or {}
    threshold = a.get("threshold")
    figures = []
    for img in view.images:
        if img.prediction_id is not None and img.has_heatmap:
            caption_note = ("" if img.has_radiograph else
                            '<br><span class="muted">radiograph no longer in the spool: '
                            "heatmap alone</span>")
            picture = (f'<img class="overlay" alt="heatmap over radiograph '
                       f'{esc(img.sop_instance_uid)}" src="/overlay/{img.prediction_id}.png">'
                       f"{caption_note}")
        else:
            picture = '<div class="no-image">no heatmap</div>'
        if img.scored:
            called = None if img.probability is None or threshold is None \
                else img.probability >= threshold
            verdict = f"probability <b>{prob(img.probability)}</b> · {call(called)}"
        else:
            verdict = f'<span class="skip">skipped: {esc(img.skip_reason or "–")}</span>'
        figures.append(
            f'<figure class="image">{picture}<figcaption>'
            f'<span class="uid">{esc(img.sop_instance_uid)}</span><br>'
            f"{esc(img.modality or '?')} {esc(img.view_position or '')} · {verdict}"
            f"</figcaption></figure>")
    deliveries = "".join(
        f"<tr><td>{esc(d['kind'].upper())}</td><td>{esc(d['destination'])}</td>"
        f"<td class=\"state-{esc(d['state'])}\">{esc(d['state'])}</td><td>{d['attempts']}</td>"
        f"<td>{esc((d['delivered_at'] or '')[:19])}</td><td>{esc(d['reason'] or '')}</td></tr>"
        for d in view.deliveries) or '<tr><td colspan="6">No results sent yet.</td></tr>'
    skips = [img for img in view.images if not img.scored and img.skip_reason]
    skip_html = "".join(f"<li><span class=\"uid\">{esc(i.sop_instance_uid)}</span>: "
                        f"{esc(i.skip_reason)}</li>" for i in skips)
    viewer = (f'<a class="viewer" href="{esc(view.viewer_url)}" target="_blank" '
              f'rel="noopener">Open in the PACS viewer</a>' if view.viewer_url else
              '<span class="muted">no PACS viewer link configured '
              "(viewer_url_template)</span>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Study {esc(view.accession_number or view.study_uid)} · cxr-triage</title>
<link rel="stylesheet" href="/static/style.css"></head>
<body>
<p><a href="/">← all studies</a></p>
<h1>Accession {esc(view.accession_number or "–")}</h1>
<div class="banner">{esc(banner)}</div>
<dl class="facts">
<dt>Study UID</dt><dd class="uid">{esc(view.study_uid)}</dd>
<dt>State</dt><dd class="state-{esc(view.state)}">{esc(view.state)}{
    f' <span class="muted">({esc(view.reason)})</span>' if view.reason else ''}</dd>
<dt>Received (UTC)</dt><dd>{esc((view.received_at or '')[:19])}</dd>
<dt>Probability</dt><dd id="probability">{prob(a.get("probability"))}</dd>
<dt>Call</dt><dd id="call">{call(a.get("positive"))}</dd>
<dt>Threshold</dt><dd id="threshold">{prob(threshold)}</dd>
<dt>Model</dt><dd id="model">{esc(a.get("model_version") or "–")}{
    f' ({esc(a.get("heatmap_method"))})' if a.get("heatmap_method") else ''}</dd>
<dt>Viewer</dt><dd>{viewer}</dd>
</dl>
<h2>Images</h2>
<div class="images">{"".join(figures) or '<p>No images received.</p>'}</div>
<h2>Skipped images</h2>
{f'<ul id="skips">{skip_html}</ul>' if skip_html else '<p class="muted">None.</p>'}
<h2>Delivery history</h2>
<table id="deliveries"><thead><tr><th>Object</th><th>Destination</th><th>State</th>
<th>Attempts</th><th>Delivered (UTC)</th><th>Reason</th></tr></thead>
<tbody>{deliveries}</tbody></table>
<footer>Read-only view.</footer>
</body></html>
"""


def render_overlay_png(db: Database, settings: Settings, prediction_id: int,
                       px: int = OVERLAY_PX) -> bytes | None:
    """The heatmap blended over its radiograph exactly as the SC does, as PNG; the heatmap
    alone (coloured the same way) when the radiograph has left the spool; None when the
    prediction or its heatmap is unknown."""
    import numpy as np
    from PIL import Image

    from db.models import Instance, Prediction
    from dicom_node.burnin import colorize, overlay, target_size
    from dicom_node.pixels import load_image_file
    from worker.heatmap_store import read_heatmap

    with db.session() as s:
        pred = s.get(Prediction, prediction_id)
        if pred is None:
            return None
        inst = s.get(Instance, pred.instance_id)
        heat_path = under(pred.heatmap_path, settings.heatmaps_dir)
        source = under(inst.path if inst is not None else None, settings.spool_dir)
    if heat_path is None:
        return None
    heat = np.clip(np.nan_to_num(np.squeeze(read_heatmap(heat_path))), 0.0, 1.0)
    if source is not None:
        rgb = overlay(load_image_file(source), heat, max_side=px)
    else:
        h, w = target_size(heat.shape[0], heat.shape[1], max_side=px)
        img = Image.fromarray(colorize(heat)).resize((w, h), Image.Resampling.BILINEAR)
        rgb = np.asarray(img)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["PAGE_SIZE", "BadQueryError", "ListQuery", "StudyImage", "StudyView",
           "count_studies", "load_study", "render_list_controls", "render_overlay_png",
           "render_study", "under", "viewer_url"]
