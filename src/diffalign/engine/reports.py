"""Reports people look at: image grids and curve plots as PNG, summary.json (spec E: Reports)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffalign.engine.io import atomic_path, write_json


def tensor_to_pil(
    image: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)
) -> Image.Image:
    """[C,H,W] (C=1 or 3) float tensor in `value_range` -> PIL image (clamped)."""
    lo, hi = value_range
    x = image.detach().float().cpu()
    if x.ndim == 2:
        x = x[None]
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    arr = (x.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(arr, mode="RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float `[3, H, W]` in [0, 1] (converted to RGB)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def make_grid(
    images: Sequence[Image.Image], ncols: int | None = None, pad: int = 0, background: int = 0
) -> Image.Image:
    """Row-major grid of equally sized images (the first image's size and mode)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    mode = images[0].mode
    grid = Image.new(
        mode,
        (ncols * w + (ncols - 1) * pad, nrows * h + (nrows - 1) * pad),
        color=background if mode == "L" else (background,) * 3,
    )
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(img.convert(mode), (c * (w + pad), r * (h + pad)))
    return grid


def label_grid(
    grid: Image.Image,
    nrows: int,
    ncols: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """`grid` (nrows x ncols equal cells) with a row label left of each row, a column label
    above each column and an optional title on top, on a white margin (spec E: Reports)."""
    from PIL import ImageDraw, ImageFont

    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"{len(row_labels)} row labels for {nrows} rows")
    if col_labels is not None and len(col_labels) != ncols:
        raise ValueError(f"{len(col_labels)} column labels for {ncols} columns")
    size = font_size or max(10, min(32, grid.height // max(1, nrows) // 4))
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()

    def text_size(text: str) -> tuple[int, int]:
        box = font.getbbox(text)
        return box[2] - box[0], box[3] - box[1]

    gap = max(4, size // 3)
    left = max((text_size(t)[0] for t in row_labels), default=0) + 2 * gap if row_labels else 0
    line_h = text_size("Ag")[1] + gap
    top = (line_h + gap if col_labels else 0) + (line_h + gap if title else 0)
    width = max(grid.width + left, text_size(title)[0] + 2 * gap if title else 0)
    canvas = Image.new("RGB", (width, grid.height + top), (255, 255, 255))
    canvas.paste(grid.convert("RGB"), (left, top))
    draw = ImageDraw.Draw(canvas)
    cell_w, cell_h = grid.width / ncols, grid.height / nrows
    if title:
        draw.text((gap, gap), title, fill=(0, 0, 0), font=font)
    for c, text in enumerate(col_labels or []):
        w, _ = text_size(text)
        x = left + c * cell_w + (cell_w - w) / 2
        draw.text((max(left, x), top - line_h), text, fill=(0, 0, 0), font=font)
    for r, text in enumerate(row_labels or []):
        _, h = text_size(text)
        draw.text((gap, top + r * cell_h + (cell_h - h) / 2), text, fill=(0, 0, 0), font=font)
    return canvas


def save_image(path: str | os.PathLike, image: Image.Image) -> None:
    """Save a PIL image atomically (format from the suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))


def save_image_grid(
    path: str | os.PathLike,
    images: Sequence[Image.Image] | torch.Tensor,
    ncols: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    pad: int = 0,
    upscale: int = 1,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Image.Image:
    """Save a grid of PIL images or of a [N,C,H,W] tensor batch as one PNG; returns the grid.

    `row_labels`/`col_labels`/`title` label it (`label_grid`): grids people read say what
    each row and column is.
    """
    if isinstance(images, torch.Tensor):
        images = [tensor_to_pil(x, value_range) for x in images]
    images = list(images)
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    grid = make_grid(images, ncols=ncols, pad=pad)
    if upscale > 1:
        grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
    if row_labels is not None or col_labels is not None or title:
        grid = label_grid(
            grid, math.ceil(len(images) / ncols), ncols, row_labels, col_labels, title
        )
    save_image(path, grid)
    return grid


MARKER_POINTS = 30  # series of at most this many points are drawn with markers


def _points(values) -> tuple[list, list]:
    if isinstance(values, tuple) and len(values) == 2:
        return list(values[0]), list(values[1])
    ys = list(values)
    return list(range(len(ys))), ys


def plot_curves(
    path: str | os.PathLike,
    series: Mapping[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    logy: bool = False,
) -> None:
    """One PNG with a line per series; a series is `ys` or `(xs, ys)`. Points whose y is None
    or not finite are left out, and a series left without points gets no line and no legend
    entry; a series of few points is drawn with markers (a lone point would be invisible);
    integer x values (layers, steps) get integer ticks."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    plotted = 0
    all_int = True
    x_values: set[float] = set()
    for name, values in series.items():
        xs, ys = _points(values)
        keep = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(float(y))]
        if not keep:
            continue
        xs, ys = [float(x) for x, _ in keep], [float(y) for _, y in keep]
        all_int = all_int and all(x == int(x) for x in xs)
        x_values.update(xs)
        ax.plot(xs, ys, label=name, marker="o" if len(ys) <= MARKER_POINTS else None, ms=4)
        plotted += 1
    if logy:
        ax.set_yscale("log")
    if plotted and all_int:  # few x values (layers, a short run): one tick each
        if len(x_values) <= MARKER_POINTS // 2:
            ax.set_xticks(sorted(x_values))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if plotted:
        ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_summary(path: str | os.PathLike, summary: Mapping) -> None:
    """Write a run's summary.json atomically."""
    write_json(path, dict(summary))


def save_labelled_grid(
    path: str | os.PathLike,
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    cell: int | None = None,
) -> Image.Image:
    """One PNG: a grid of images with a header row of column labels and a label per row
    (every cell resized to `cell` px, default the first image's width, min 64)."""
    from PIL import ImageDraw, ImageFont

    ncols = max(len(r) for r in rows)
    size = cell or max(64, rows[0][0].width)
    font = ImageFont.load_default()
    label_w = max(80, 7 * max([len(s) for s in row_labels] + [1]) + 10)
    head_h = 18 + (18 if title else 0)
    grid = Image.new("RGB", (label_w + ncols * size, head_h + len(rows) * size), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for c, text in enumerate(col_labels):
        draw.text((label_w + c * size + 4, head_h - 16), str(text), fill="black", font=font)
    for r, row in enumerate(rows):
        draw.text(
            (4, head_h + r * size + size // 2 - 6), str(row_labels[r]), fill="black", font=font
        )
        for c, img in enumerate(row):
            grid.paste(
                img.convert("RGB").resize((size, size)), (label_w + c * size, head_h + r * size)
            )
    save_image(path, grid)
    return grid
