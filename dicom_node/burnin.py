"""Rendering of the heatmap picture: colour overlay, colour scale bar and burned-in text.

Kept apart from the DICOM object so the picture can be checked on its own (and written
as a PNG for a human to look at). Everything here works on numpy arrays and PIL images
and uses no network or font files: Pillow's built-in scalable font is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

# A perceptual rainbow (Google's Turbo) as a 256-entry uint8 lookup table.
TURBO_LUT: np.ndarray = (colormaps["turbo"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).round(
).astype(np.uint8)

MAX_SIDE = 1024
#: The colour bar's title: its 0-1 scale is the heatmap's, not a probability.
BAR_TITLE = "relative attention, not probability"
MAX_ALPHA = 0.55


@dataclass(frozen=True)
class Caption:
    """The text burned into the picture."""

    probability: float
    threshold: float
    model_name: str
    model_version: str
    heatmap_method: str
    # the pneumonia-pattern finding (three-class models only)
    pneumonia_probability: float | None = None
    pneumonia_threshold: float | None = None

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold

    def lines(self) -> list[str]:
        call = "POSITIVE" if self.positive else "NEGATIVE"
        pneumonia = []
        if self.pneumonia_probability is not None and self.pneumonia_threshold is not None:
            pcall = "POSITIVE" if self.pneumonia_probability >= self.pneumonia_threshold \
                else "NEGATIVE"
            pneumonia = [f"Pneumonia pattern probability {self.pneumonia_probability:.2f}: "
                         f"{pcall} (threshold {self.pneumonia_threshold:.2f})"]
        return [
            f"COVID-19 probability {self.probability:.2f}: {call} "
            f"(threshold {self.threshold:.2f})",
            *pneumonia,
            f"Model {self.model_name} {self.model_version}, heatmap {self.heatmap_method}",
            "AI RESULT - NOT FOR DIAGNOSTIC USE",
        ]


def colorize(values01: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 through the Turbo table."""
    idx = np.clip(np.nan_to_num(values01, nan=0.0), 0.0, 1.0) * 255.0
    rgb: np.ndarray = TURBO_LUT[idx.round().astype(np.intp)]
    return rgb


def target_size(height: int, width: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(height, width) with the long side at most ``max_side``; never upscaled."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize(array01: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if array01.shape == size_hw:
        return array01.astype(np.float32)
    img = Image.fromarray(np.clip(array01, 0.0, 1.0).astype(np.float32), mode="F")
    resized = img.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
    out: np.ndarray = np.asarray(resized, dtype=np.float32)
    return out


def overlay(image01: np.ndarray, heatmap01: np.ndarray | None,
            max_side: int = MAX_SIDE) -> np.ndarray:
    """The radiograph in grey with the heatmap blended in colour, RGB uint8.

    The colour's opacity grows with the heatmap value, so cold regions show the
    radiograph almost untouched and hot regions stand out.
    """
    if image01.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image01.shape}")
    height, width = image01.shape
    size = target_size(height, width, max_side=max_side)
    grey = _resize(image01, size)
    base = np.repeat(np.clip(grey, 0.0, 1.0)[..., None] * 255.0, 3, axis=2)
    if heatmap01 is None:
        return base.round().astype(np.uint8)
    heat = np.clip(_resize(heatmap01, size), 0.0, 1.0)
    alpha = (MAX_ALPHA * heat)[..., None]
    blended: np.ndarray = (1.0 - alpha) * base + alpha * colorize(heat).astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


MIN_FONT_PX = 10


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines no wider than ``width`` pixels."""
    lines: list[str] = []
    current = ""
    words: list[str] = []
    for word in text.split():
        # A word wider than the picture (a long model name) is cut by characters.
        while font.getlength(word) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            words.append(word[:cut])
            word = word[cut:]
        words.append(word)
    for word in words:
        trial = f"{current} {word}".strip()
        if current and font.getlength(trial) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return [*lines, current] if current else lines


def _bar_layout(height: int) -> tuple[int, int, int]:
    """(font px, strip width, total width) of a colour bar beside a body ``height`` tall."""
    font_px = max(MIN_FONT_PX, round(height / 40))
    strip_w = max(8, font_px)
    label_w = round(_font(font_px).getlength("0.0"))
    # The title runs up the bar's right-hand side, rotated: one line of text tall.
    return font_px, strip_w, 3 + strip_w + 5 + label_w + 4 + font_px + 4


def render(image01: np.ndarray, heatmap01: np.ndarray | None, caption: Caption,
           max_side: int = MAX_SIDE) -> np.ndarray:
    """The full picture: a caption banner on top, the overlay, a colour bar on the right.

    The caption's font scales with the picture (never below a legible minimum); on small
    pictures its lines wrap instead of running off the edge.
    """
    body = overlay(image01, heatmap01, max_side=max_side)
    h, w = body.shape[:2]
    bar_font_px, strip_w, bar_w = _bar_layout(h)
    if heatmap01 is None:
        bar_w = 0
    canvas_w = w + bar_w
    font_px = max(MIN_FONT_PX, round(max(h, w) / 48))
    pad = max(3, font_px // 3)
    font = _font(font_px)
    colours = [
        (255, 96, 64) if caption.positive else (96, 224, 96),
        (255, 255, 255),
        (255, 220, 0),
    ]
    rows: list[tuple[str, tuple[int, int, int]]] = []
    for line, colour in zip(caption.lines(), colours, strict=True):
        rows.extend((part, colour) for part in _wrap(line, font, canvas_w - 2 * pad))
    banner_h = pad + len(rows) * (font_px + pad) + pad
    canvas = Image.new("RGB", (canvas_w, banner_h + h), (0, 0, 0))
    canvas.paste(Image.fromarray(body, mode="RGB"), (0, banner_h))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for text, colour in rows:
        draw.text((pad, y), text, fill=colour, font=font)
        y += font_px + pad
    if bar_w:
        _draw_colour_bar(canvas, draw, x0=w, y0=banner_h, height=h, font_px=bar_font_px,
                         strip_w=strip_w)
    return np.asarray(canvas, dtype=np.uint8)


def _draw_colour_bar(canvas: Image.Image, draw: ImageDraw.ImageDraw, x0: int, y0: int,
                     height: int, font_px: int, strip_w: int) -> None:
    """A vertical scale from 1 (top) to 0 (bottom) with tick labels."""
    margin = font_px
    bar_h = max(2, height - 2 * margin)
    ramp = np.linspace(1.0, 0.0, bar_h, dtype=np.float32)[:, None].repeat(strip_w, axis=1)
    canvas.paste(Image.fromarray(colorize(ramp), mode="RGB"), (x0 + 3, y0 + margin))
    font = _font(font_px)
    for value in (1.0, 0.5, 0.0):
        ty = y0 + margin + round((1.0 - value) * (bar_h - 1))
        draw.line([(x0 + 3 + strip_w, ty), (x0 + 6 + strip_w, ty)], fill=(255, 255, 255))
        draw.text((x0 + 8 + strip_w, ty), f"{value:.1f}", fill=(255, 255, 255), font=font,
                  anchor="lm")
    _draw_bar_title(canvas, x0 + 8 + strip_w + round(font.getlength("0.0")) + 4,
                    y0 + margin, bar_h, font_px)


def _draw_bar_title(canvas: Image.Image, x: int, y: int, length: int, font_px: int) -> None:
    """:data:`BAR_TITLE` written bottom to top beside the bar, shrunk to fit its length."""
    size = font_px
    font = _font(size)
    while size > 6 and font.getlength(BAR_TITLE) > length:
        size -= 1
        font = _font(size)
    text_w = min(length, round(font.getlength(BAR_TITLE)) + 2)
    strip = Image.new("RGB", (text_w, font_px + 2), (0, 0, 0))
    ImageDraw.Draw(strip).text((0, (font_px + 2) // 2), BAR_TITLE, fill=(255, 255, 255),
                               font=font, anchor="lm")
    rotated = strip.rotate(90, expand=True)
    canvas.paste(rotated, (x, y + (length - rotated.height) // 2))


__all__ = ["BAR_TITLE", "Caption", "TURBO_LUT", "colorize", "overlay", "render", "target_size"]
