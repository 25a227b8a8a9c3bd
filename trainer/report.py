"""An HTML report of a nightly run or an evaluation, with PNG plots (matplotlib, Agg).

Champion and challenger are drawn on the same axes for the same test patients: ROC and PR
curves, reliability curves; and per model the score histograms by class and by source (as
in Deep-COVID's figures 6-9) and the confusion matrix at its operating threshold.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trainer.metrics import curves, reliability_curve  # noqa: E402

COLOURS = ("tab:blue", "tab:orange")  # not COVID-19, COVID-19: the same in every panel


@dataclass
class ModelScores:
    """One model's scores on the evaluated cases."""

    name: str
    y: np.ndarray
    p: np.ndarray
    sources: Sequence[str]
    threshold: float
    metrics: dict[str, Any] = field(default_factory=dict)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40]


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _roc_pr(models: Sequence[ModelScores], out: Path) -> list[str]:
    fig1, ax1 = plt.subplots(figsize=(5, 5))
    fig2, ax2 = plt.subplots(figsize=(5, 5))
    for m in models:
        c = curves(m.y, m.p)
        if c is None:
            continue
        auc = m.metrics.get("auc")
        label = m.name + ("" if auc is None else f" (AUC {auc:.3f})")
        ax1.plot(c["fpr"], c["tpr"], label=label)
        ax2.plot(c["recall"], c["precision"], label=m.name)
    ax1.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax1.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    ax2.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall")
    ax1.legend(loc="lower right", fontsize=8)
    ax2.legend(loc="lower left", fontsize=8)
    return [_save(fig1, out / "roc.png"), _save(fig2, out / "pr.png")]


def _reliability(models: Sequence[ModelScores], out: Path) -> str:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    for m in models:
        rc = reliability_curve(m.y, m.p)
        ax.plot([b["mean_score"] for b in rc], [b["fraction_positive"] for b in rc], "o-",
                label=m.name)
    ax.set(xlabel="mean predicted probability", ylabel="fraction positive", title="Reliability")
    ax.legend(fontsize=8)
    return _save(fig, out / "reliability.png")


def _histograms(m: ModelScores, out: Path) -> list[str]:
    slug = _slug(m.name)
    bins = [i / 20 for i in range(21)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, name in ((0, "not COVID-19"), (1, "COVID-19")):
        ax.hist(m.p[m.y == lab], bins=bins, alpha=0.6, color=COLOURS[lab],
                label=f"{name} (n={(m.y == lab).sum()})")
    ax.axvline(m.threshold, color="k", ls="--", lw=1, label=f"threshold {m.threshold:.3f}")
    ax.set(xlabel="predicted probability", ylabel="images", title=f"{m.name}: scores by class")
    ax.legend(fontsize=8)
    names = [_save(fig, out / f"hist-class-{slug}.png")]
    src = np.asarray(list(m.sources), dtype=object)
    groups = sorted(set(src.tolist()))
    fig, axes = plt.subplots(len(groups), 1, figsize=(6, 1.6 * len(groups) + 0.8), squeeze=False)
    for ax, g in zip(axes[:, 0], groups, strict=True):
        for lab, name in ((0, "not COVID-19"), (1, "COVID-19")):
            sel = (src == g) & (m.y == lab)
            if sel.any():
                ax.hist(m.p[sel], bins=bins, alpha=0.6, color=COLOURS[lab],
                        label=f"{name} ({sel.sum()})")
        ax.axvline(m.threshold, color="k", ls="--", lw=1)
        ax.set_ylabel(g, fontsize=8)
        ax.legend(fontsize=7)
    axes[0, 0].set_title(f"{m.name}: scores by source")
    axes[-1, 0].set_xlabel("predicted probability")
    names.append(_save(fig, out / f"hist-source-{slug}.png"))
    return names


def _confusion(m: ModelScores, out: Path) -> str:
    pred = m.p >= m.threshold
    mat = np.array([[((m.y == 0) & ~pred).sum(), ((m.y == 0) & pred).sum()],
                    [((m.y == 1) & ~pred).sum(), ((m.y == 1) & pred).sum()]])
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(mat, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(mat[i, j]), ha="center", va="center", fontsize=12)
    ax.set_xticks([0, 1], ["pred neg", "pred pos"])
    ax.set_yticks([0, 1], ["not COVID", "COVID"])
    ax.set_title(f"{m.name}\nthreshold {m.threshold:.3f}", fontsize=9)
    return _save(fig, out / f"confusion-{_slug(m.name)}.png")


def _fmt(v: Any, ci: Any = None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        text = f"{v:.3f}"
        if ci:
            text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        return text
    return html.escape(str(v))


def _metrics_table(models: Sequence[ModelScores]) -> str:
    keys = ("auc", "pr_auc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy",
            "brier")
    head = "".join(f"<th>{html.escape(m.name)}</th>" for m in models)
    rows = ["<tr><td>images (positive)</td>" + "".join(
        f"<td>{m.metrics.get('n')} ({m.metrics.get('n_positive')})</td>" for m in models)
        + "</tr>", "<tr><td>threshold</td>" + "".join(
        f"<td>{m.threshold:.4f}</td>" for m in models) + "</tr>"]
    for k in keys:
        rows.append(f"<tr><td>{k}</td>" + "".join(
            f"<td>{_fmt(m.metrics.get(k), m.metrics.get(k + '_ci'))}</td>" for m in models)
            + "</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def _per_source_table(models: Sequence[ModelScores]) -> str:
    rows = []
    for m in models:
        for src, s in (m.metrics.get("per_source") or {}).items():
            rows.append(
                f"<tr><td>{html.escape(m.name)}</td><td>{html.escape(src)}</td>"
                f"<td>{s['n']}</td><td>{s['n_positive']}</td>"
                f"<td>{_fmt(s['auc'], s['auc_ci'])}</td>"
                f"<td>{_fmt(s['sensitivity'], s['sensitivity_ci'])}</td>"
                f"<td>{_fmt(s['specificity'], s['specificity_ci'])}</td></tr>"
            )
    return ("<table><tr><th>model</th><th>source</th><th>n</th><th>positive</th><th>AUC</th>"
            "<th>sensitivity</th><th>specificity</th></tr>" + "".join(rows) + "</table>")


def _three_class_table(models: Sequence[ModelScores]) -> str:
    """The pneumonia-pattern finding, one-vs-rest AUCs and the 3x3 confusion matrix of the
    three-class models (empty where none has them)."""
    parts = []
    for m in models:
        r = m.metrics
        if "pneumonia_auc" not in r:
            continue
        rows = [f"<tr><td>pneumonia pattern AUC</td>"
                f"<td>{_fmt(r['pneumonia_auc'], r.get('pneumonia_auc_ci'))}</td></tr>",
                f"<tr><td>pneumonia threshold</td><td>{_fmt(r.get('pneumonia_threshold'))}"
                f"</td></tr>",
                f"<tr><td>pneumonia sensitivity / specificity</td>"
                f"<td>{_fmt(r.get('pneumonia_sensitivity'))} / "
                f"{_fmt(r.get('pneumonia_specificity'))}</td></tr>"]
        rows += [f"<tr><td>one-vs-rest AUC: {html.escape(k)}</td><td>{_fmt(v)}</td></tr>"
                 for k, v in (r.get("class_auc") or {}).items()]
        for src, s in (r.get("per_source") or {}).items():
            if "pneumonia_auc" in s:
                rows.append(f"<tr><td>{html.escape(src)}: pneumonia vs normal AUC</td>"
                            f"<td>{_fmt(s['pneumonia_auc'], s.get('pneumonia_auc_ci'))}</td></tr>")
            if "covid_vs_other_pneumonia_auc" in s:
                value = _fmt(s["covid_vs_other_pneumonia_auc"],
                             s.get("covid_vs_other_pneumonia_auc_ci"))
                rows.append(f"<tr><td>{html.escape(src)}: COVID-19 vs other pneumonia AUC</td>"
                            f"<td>{value}</td></tr>")
        cm = r["confusion_3x3"]
        head = "".join(f"<th>call {html.escape(c)}</th>" for c in cm["classes"])
        body = "".join(
            f"<tr><th>true {html.escape(c)}</th>" + "".join(f"<td>{v}</td>" for v in row)
            + "</tr>" for c, row in zip(cm["classes"], cm["matrix"], strict=True))
        parts.append(f"<h3>{html.escape(m.name)}</h3><table>{''.join(rows)}</table>"
                     f"<table><tr><th></th>{head}</tr>{body}</table>")
    if not parts:
        return ""
    return "<h2>Three classes: pneumonia pattern and COVID-19</h2>" + "".join(parts)


def _threshold_table(m: ModelScores) -> str:
    rows = "".join(
        f"<tr><td>{r['threshold']:.1f}</td><td>{_fmt(r['sensitivity'], r['sensitivity_ci'])}"
        f"</td><td>{_fmt(r['specificity'], r['specificity_ci'])}</td></tr>"
        for r in m.metrics.get("threshold_table", [])
    )
    return (f"<h3>{html.escape(m.name)}: sensitivity and specificity by threshold</h3>"
            "<table><tr><th>threshold</th><th>sensitivity</th><th>specificity</th></tr>"
            f"{rows}</table>")


def _deployed_table(deployed: Sequence[dict[str, Any]]) -> str:
    if not deployed:
        return "<p>No labelled studies with stored predictions yet.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(str(d['model_version']))}</td><td>{d['month']}</td>"
        f"<td>{d['n']}</td><td>{d['n_positive']}</td>"
        f"<td>{_fmt(d['sensitivity'], d.get('sensitivity_ci'))}</td>"
        f"<td>{_fmt(d['specificity'], d.get('specificity_ci'))}</td>"
        f"<td>{_fmt(d['positive_rate'])}</td></tr>"
        for d in deployed
    )
    return ("<table><tr><th>model</th><th>month</th><th>studies</th><th>labelled positive</th>"
            "<th>sensitivity</th><th>specificity</th><th>positive rate</th></tr>"
            f"{rows}</table>")


CSS = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
       "margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px}"
       "img{margin:4px;border:1px solid #ddd}.warn{color:#a40}")


def write_report(out_dir: Path, title: str, models: Sequence[ModelScores], *,
                 summary: dict[str, Any] | None = None, reasons: Sequence[str] = (),
                 deployed: Sequence[dict[str, Any]] = (), drift: dict[str, Any] | None = None,
                 notes: Sequence[str] = ()) -> Path:
    """Write ``out_dir/index.html`` (and PNGs beside it); return the index path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images: list[str] = []
    scored = [m for m in models if m.y.size]
    if scored:
        images += _roc_pr(scored, out_dir)
        images.append(_reliability(scored, out_dir))
        for m in scored:
            images += _histograms(m, out_dir)
            images.append(_confusion(m, out_dir))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if summary:
        parts.append("<h2>Summary</h2><table>" + "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>"
            for k, v in summary.items()) + "</table>")
    if reasons:
        parts.append("<h2>Decision</h2><ul>" + "".join(
            f"<li>{html.escape(r)}</li>" for r in reasons) + "</ul>")
    for n in notes:
        parts.append(f"<p class='warn'>{html.escape(n)}</p>")
    if scored:
        parts.append("<h2>Test patients</h2>" + _metrics_table(scored))
        parts.append("<h2>Per source</h2>" + _per_source_table(scored))
        parts.append(_three_class_table(scored))
        parts += [_threshold_table(m) for m in scored]
        parts.append("<h2>Plots</h2>" + "".join(
            f"<img src='{html.escape(i)}' alt='{html.escape(i)}'>" for i in images))
    if drift:
        parts.append("<h2>Champion on recently labelled studies (drift)</h2><pre>"
                     + html.escape(json.dumps(drift, indent=1, default=str)) + "</pre>")
    parts.append("<h2>As deployed: stored predictions joined with later labels</h2>"
                 + _deployed_table(deployed))
    parts.append("</body></html>")
    index = out_dir / "index.html"
    tmp = out_dir / ".index.html.tmp"
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(index)
    return index


__all__ = ["ModelScores", "write_report"]
