"""The pictures of tools/show_samples.py: an item's image with each target mask in its own
colour, above a text panel holding every question and answer with each `[SEG]`/`[REJ]` in its
mask's colour (PIL, OpenCV and numpy only)."""

from __future__ import annotations

import math
import re

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from model.tokens import REJ_TOKEN, SEG_TOKEN
from utils.datasets.base import IGNORE_LABEL, Sample

TARGET_TOKENS = re.compile(f"({re.escape(SEG_TOKEN)}|{re.escape(REJ_TOKEN)})")
Colour = tuple[int, int, int]
# a text panel's words: (text, colour) pieces, laid out as lines of (x, text, colour)
Piece = tuple[str, Colour]
Line = list[tuple[float, str, Colour]]
# distinct colours (Trubetskoy's list), one per target, cycled after the last
PALETTE: tuple[Colour, ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (215, 180, 0),  # the list's yellow, darkened to read on white
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
)
MASK_ALPHA = 0.5
IGNORE_DIM = 0.4  # ignore pixels (255) kept by `--ignore_pixels exclude` are darkened to this
VIS_MIN_WIDTH = 640  # smaller images are enlarged by an integer factor, so the text fits
FONT_PER_WIDTH = 48  # font size = panel width / this (at least MIN_FONT)
MIN_FONT = 12
LINE_SPACING = 1.3  # line height / font size
TEXT_COLOUR, PANEL_COLOUR = (20, 20, 20), (255, 255, 255)


def overlay(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] + masks uint8 [k, H, W] -> uint8 [H, W, 3]: mask i's pixels blended
    with PALETTE[i] (cycled) and outlined in it, ignore pixels darkened, the rest unchanged."""
    out = image.astype(np.float32)
    out[(masks == IGNORE_LABEL).any(axis=0)] *= IGNORE_DIM
    for number, mask in enumerate(masks):
        colour = np.asarray(PALETTE[number % len(PALETTE)], dtype=np.float32)
        inside = mask == 1
        out[inside] = (1 - MASK_ALPHA) * out[inside] + MASK_ALPHA * colour
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    for number, mask in enumerate(masks):
        contours, _ = cv2.findContours(
            (mask == 1).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(out, contours, -1, PALETTE[number % len(PALETTE)], thickness=1)
    return out


def vis_scale(width: int) -> int:
    """The integer factor that brings an image to at least VIS_MIN_WIDTH pixels wide."""
    return max(1, math.ceil(VIS_MIN_WIDTH / width))


def text_pieces(text: str, first_target: int) -> list[Piece]:
    """(piece, colour) of a text: words in TEXT_COLOUR, each `[SEG]`/`[REJ]` in the colour of
    its mask (targets numbered from `first_target`), "\\n" as its own piece."""
    pieces, target = [], first_target
    for part in TARGET_TOKENS.split(text):
        if TARGET_TOKENS.fullmatch(part):
            pieces.append((part, PALETTE[target % len(PALETTE)]))
            target += 1
            continue
        for line_number, line in enumerate(part.split("\n")):
            if line_number:
                pieces.append(("\n", TEXT_COLOUR))
            pieces += [(word, TEXT_COLOUR) for word in re.findall(r"\S+\s*|\s+", line)]
    return pieces


def layout_lines(
    pieces: list[Piece], font: ImageFont.FreeTypeFont, width: int, margin: int
) -> list[Line]:
    """Pieces wrapped into lines of (x, text, colour) no wider than `width` where possible."""
    lines, line, x = [], [], margin
    for text, colour in pieces:
        advance = font.getlength(text)
        if text == "\n" or (x + advance > width - margin and line):
            lines.append(line)
            line, x = [], margin
            if text == "\n" or not text.strip():
                continue
        line.append((x, text, colour))
        x += advance
    return lines + [line]


def sample_text(record: dict) -> list[Piece]:
    """The pieces of an item's text panel: a header line, then every round's Q and A."""
    pieces = text_pieces(f"#{record['index']} {record['source']} {record['image']}\n", 0)
    lengths, target = record["token_lengths"], 0
    for entry in record["conversations"]:
        if entry["round"] == 0:
            tokens = f" ({lengths[entry['conversation']]} tokens)" if lengths else ""
            pieces += text_pieces(f"\nconversation {entry['conversation']}{tokens}\n", 0)
        pieces += text_pieces(f"Q: {entry['question']}\n", 0)
        pieces += text_pieces(f"A: {entry['answer']}\n", target)
        target += entry["num_seg"] + entry["num_rej"]
    return pieces


def render_preview(sample: Sample, record: dict) -> Image.Image:
    """A PIL image: the overlay, enlarged by `vis_scale`, above the wrapped text panel."""
    scale = vis_scale(sample.image.shape[1])
    picture = overlay(sample.image, sample.masks)
    if scale > 1:
        height, width = picture.shape[:2]
        picture = cv2.resize(
            picture, (width * scale, height * scale), interpolation=cv2.INTER_NEAREST
        )
    width = picture.shape[1]
    font = ImageFont.load_default(size=max(MIN_FONT, width // FONT_PER_WIDTH))
    margin, line_height = font.size // 2, int(font.size * LINE_SPACING)
    lines = layout_lines(sample_text(record), font, width, margin)
    canvas = Image.new(
        "RGB", (width, picture.shape[0] + line_height * len(lines) + margin), PANEL_COLOUR
    )
    canvas.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(lines):
        y = picture.shape[0] + margin // 2 + number * line_height
        for x, text, colour in line:
            draw.text((x, y), text, fill=colour, font=font)
    return canvas
