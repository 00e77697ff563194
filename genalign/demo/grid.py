"""Labelled image grids for the page and the download (PIL only)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DISPLAY_SIZE = 128  # small images (the shapes world's 32 px) are enlarged to this, pixel-exact


def to_image(image: object) -> Image.Image:
    """A PIL RGB image from a tensor (3, H, W) in [0, 1], an array (H, W, 3) or a PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if hasattr(image, "detach"):
        image = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array, "RGB")


def enlarge(image: Image.Image, size: int = DISPLAY_SIZE, largest: int | None = None) -> Image.Image:
    """Scale a small image up by a whole factor (nearest neighbour) so each pixel stays visible;
    shrink one larger than ``largest`` (keeping its aspect)."""
    if largest is not None and max(image.size) > largest:
        scale = largest / max(image.size)
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                            Image.Resampling.LANCZOS)
    factor = max(1, size // max(image.size))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_block(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width_px: int, font, line_px: int,
                max_lines: int) -> None:
    chars = max(4, width_px // max(1, line_px // 2))
    lines = textwrap.wrap(text, chars)[:max_lines] or [""]
    for i, line in enumerate(lines):
        draw.text((xy[0], xy[1] + i * line_px), line, fill=(230, 230, 230), font=font)


def assemble_grid(
    rows: Sequence[Sequence[object]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    captions: Sequence[Sequence[str]] | None = None,
    cell_size: int = DISPLAY_SIZE,
    largest_cell: int = 512,
) -> Image.Image:
    """One image: a header row of column labels, a label column, and ``rows[r][c]`` in the cells
    (small ones enlarged to about ``cell_size``, large ones shrunk to ``largest_cell``),
    optionally a caption under each cell."""
    if len(rows) != len(row_labels):
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} row labels")
    if any(len(row) != len(column_labels) for row in rows):
        raise ValueError(f"every row needs {len(column_labels)} images")
    cells = [[enlarge(to_image(image), cell_size, largest_cell) for image in row] for row in rows]
    cell_w = max((im.width for row in cells for im in row), default=cell_size)
    cell_h = max((im.height for row in cells for im in row), default=cell_size)
    font_px = max(10, min(16, cell_w // 10))
    line_px = font_px + 3
    font = _font(font_px)
    pad = 4
    label_w = max(cell_w, 8 * font_px)
    header_h = 3 * line_px + pad
    caption_h = 2 * line_px if captions is not None else 0
    width = label_w + len(column_labels) * (cell_w + pad) + pad
    height = header_h + len(rows) * (cell_h + caption_h + pad) + pad
    grid = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        _text_block(draw, (label_w + c * (cell_w + pad) + pad, pad), label, cell_w, font, line_px, 3)
    for r, row in enumerate(cells):
        top = header_h + r * (cell_h + caption_h + pad)
        _text_block(draw, (pad, top + pad), row_labels[r], label_w - 2 * pad, font, line_px, max(1, cell_h // line_px))
        for c, image in enumerate(row):
            left = label_w + c * (cell_w + pad) + pad
            grid.paste(image, (left + (cell_w - image.width) // 2, top + (cell_h - image.height) // 2))
            if captions is not None:
                _text_block(draw, (left, top + cell_h + 1), captions[r][c], cell_w, font, line_px, 2)
    return grid
