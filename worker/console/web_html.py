"""The HTML fragments every page of the web console shares: an escaped value, a
probability and a call, so the pages cannot drift apart in how they show them."""

from __future__ import annotations

import html
from typing import Any


def esc(value: Any) -> str:
    """``value`` as escaped HTML text; None shows as nothing."""
    return html.escape("" if value is None else str(value))


def prob(value: float | None) -> str:
    """A probability with three decimals, or a dash when there is none."""
    return "–" if value is None else f"{value:.3f}"


def call(positive: bool | None) -> str:
    """A positive or negative call, styled; a dash when there is none."""
    if positive is None:
        return "–"
    return ('<span class="call-positive">POSITIVE</span>' if positive
            else '<span class="call-negative">negative</span>')
