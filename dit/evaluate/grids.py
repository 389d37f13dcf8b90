"""Sample grids: a PNG of rank 0's first samples per evaluation.

Class-balanced: one row per class when there are at most 16 classes, else the first 64 distinct
classes, 8 to a row; upscaled with nearest-neighbour so each cell is at least 64 px. In the
training loop they are saved as :func:`sample_grid_path` (``samples_step<NNNNNNNN>.png``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit.files import atomic_path

__all__ = ["GRID_IMAGES", "GRID_MIN_CELL_PX", "grid_layout", "sample_grid", "sample_grid_path", "save_sample_grid"]

GRID_IMAGES = 64
GRID_MIN_CELL_PX = 64


def sample_grid_path(sample_dir: str | Path, step: int) -> Path:
    """The sample grid of the evaluation after ``step``."""
    return Path(sample_dir) / f"samples_step{step:08d}.png"


def grid_layout(num_classes: int, max_images: int = GRID_IMAGES) -> tuple[int, int]:
    """(rows, per-class quota): a row per class for up to 16 classes, else one sample of each
    of the first ``max_images`` classes met, 8 to a row."""
    if 1 <= num_classes <= 16:
        return num_classes, max(1, min(8, max_images // num_classes))
    return math.ceil(max_images / 8), 1


class _GridPool:
    """Keeps, from images in sample order, what the grid needs (at most ``max_images``)."""

    def __init__(self, num_classes: int, max_images: int = GRID_IMAGES) -> None:
        self.num_classes, self.max_images = num_classes, max_images
        self.rows, self.quota = grid_layout(num_classes, max_images)
        self.picked: dict[int, list[torch.Tensor]] = {}
        self.order: list[int] = []  # classes in the order first met (many-class layout)
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count >= (self.rows * self.quota if self.num_classes <= 16 else self.max_images)

    def add(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        for img, y in zip(images, labels.tolist()):
            if self.full:
                return
            have = self.picked.setdefault(int(y), [])
            if len(have) >= self.quota:
                continue
            if not have:
                self.order.append(int(y))
            have.append(img.detach().float().cpu())
            self.count += 1

    def cells(self) -> list[list[torch.Tensor | None]]:
        if self.num_classes <= 16:
            return [(self.picked.get(c, []) + [None] * self.quota)[: self.quota] for c in range(self.num_classes)]
        flat = [self.picked[c][0] for c in self.order]
        return [flat[i : i + 8] + [None] * (8 - len(flat[i : i + 8])) for i in range(0, len(flat), 8)]


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, 3) uint8; other channel counts show channel means."""
    x = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[0] == 3:
        return x.permute(1, 2, 0).numpy()
    if x.shape[0] == 1:
        return x[0].numpy()
    return x[:3].permute(1, 2, 0).numpy() if x.shape[0] > 3 else x.float().mean(0).round().to(torch.uint8).numpy()


def sample_grid(rows: list[list[torch.Tensor | None]], min_cell_px: int = GRID_MIN_CELL_PX, pad: int = 2) -> np.ndarray:
    """A (H, W, 3) uint8 mosaic of images in [-1, 1]; empty cells stay dark grey."""
    first = next((c for r in rows for c in r if c is not None), None)
    if first is None:
        raise ValueError("a sample grid needs at least one image")
    h, w = first.shape[-2:]
    scale = max(1, math.ceil(min_cell_px / max(min(h, w), 1)))
    ch, cw = h * scale, w * scale
    ncols = max(len(r) for r in rows)
    out = np.full((len(rows) * (ch + pad) + pad, ncols * (cw + pad) + pad, 3), 32, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img is None:
                continue
            a = _to_uint8(img)
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=2)
            a = a.repeat(scale, 0).repeat(scale, 1)
            y0, x0 = pad + i * (ch + pad), pad + j * (cw + pad)
            out[y0 : y0 + ch, x0 : x0 + cw] = a
    return out


def save_sample_grid(rows: list[list[torch.Tensor | None]], path: str | Path, **kw: Any) -> Path:
    """Write :func:`sample_grid` as a PNG (atomically: a reader never sees half a file)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(sample_grid(rows, **kw)).save(tmp, format="PNG")
    return path
