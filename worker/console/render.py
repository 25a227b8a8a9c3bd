"""Text renderings for the operator: the ``cxr-triage status`` table.

Shared by the CLI and the demo, so neither imports the other.
"""

from __future__ import annotations

from typing import Any, TextIO


def fmt_prob(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _call(pred: dict[str, Any] | None, key: str = "positive") -> str:
    if pred is None or pred.get(key) is None:
        return "-"
    return "POSITIVE" if pred[key] else "negative"


def _delivery_text(deliveries: list[dict[str, Any]]) -> str:
    if not deliveries:
        return "-"
    return ", ".join(f"{d['kind']}:{d['state']}" for d in deliveries)


def render_status_table(data: dict[str, Any], out: TextIO) -> None:
    """A fixed-width table for humans, then the summary.  PROB and CALL are the COVID-19
    finding; PNEU and PNEU CALL the pneumonia pattern of a three-class model ("-" where
    the model has no such output)."""
    header = ("STUDY UID", "STATE", "N", "RECEIVED", "PROB", "CALL", "PNEU", "PNEU CALL",
              "MODEL", "DELIVERY", "REASON")
    rows = []
    for st in data["studies"]:
        pred = st["prediction"]
        rows.append((
            st["study_uid"],
            st["state"],
            str(st["instances"]),
            (st["received_at"] or "-")[:19],
            fmt_prob(pred["probability"] if pred else None),
            _call(pred),
            fmt_prob((pred or {}).get("pneumonia_probability")),
            _call(pred, "pneumonia_positive"),
            (pred or {}).get("model_version") or "-",
            _delivery_text(st["deliveries"]),
            (st["reason"] or "")[:60],
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = "  ".join(h.ljust(widths[i]) for i, h in enumerate(header))
    out.write(line.rstrip() + "\n")
    for r in rows:
        out.write("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() + "\n")
    if not rows:
        out.write("(no studies)\n")
    summ = data["summary"]
    counts = ", ".join(f"{k}={v}" for k, v in summ["studies_by_state"].items())
    out.write(f"\nstudies: {summ['total_studies']} ({counts})\n")
    oldest = summ["oldest_waiting"]
    if oldest:
        out.write(f"oldest waiting: {oldest['study_uid']} {oldest['state']} for "
                  f"{oldest['waiting_seconds']:.0f} s\n")
    for d in summ["failed_deliveries"]:
        out.write(f"failed delivery: {d['study_uid']} {d['kind']} -> {d['destination']} "
                  f"after {d['attempts']} attempts: {d['reason']}\n")
    prod = summ["production_model"]
    held = summ.get("newest_model_not_promoted")
    if prod is None and held is None:
        out.write("production model: none registered (see `cxr-triage up --help`)\n")
    elif prod is None:
        out.write("production model: none\n")
    else:
        ev = prod["last_evaluation"]
        ev_text = "no evaluation" if ev is None else (
            f"{ev['kind']} on {ev['dataset']}: n={ev['n_images']} AUC={fmt_prob(ev['auc'])} "
            f"sens={fmt_prob(ev['sensitivity'])} spec={fmt_prob(ev['specificity'])}")
        out.write(f"production model: {prod['version']} ({prod['architecture']}, "
                  f"threshold {prod['threshold']:.3f}); last evaluation: {ev_text}\n")
    if held is not None:
        out.write(f"newest model {held['version']} is {held['stage']}, not promoted: "
                  f"{held['not_promoted_reason'] or 'no reason recorded'}\n")
