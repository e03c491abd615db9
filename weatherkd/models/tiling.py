"""Running an image-to-image model over overlapping tiles: bounded memory at any image size.

Neighbouring tiles overlap by at least ``overlap`` pixels. Each tile's output is weighted by a
window over the overlap on every side that meets another tile: 0 over the quarter of the overlap
nearest the tile's edge (where the model saw the tile's padding, not the image), then a raised
cosine up to 1 over the middle half. Where two tiles overlap by exactly ``overlap`` their windows
sum to 1, so the result moves from one tile's output to the next across the middle of the overlap,
and weighted outputs are divided by the summed weights. So:
- a model whose receptive field reaches at most ``overlap // 4`` pixels gives exactly its
  whole-image output;
- a model that sees further (a U-Net, attention, global pooling) leaves no seam: a hard cut at the
  middle of the overlap would leave a step there, and the step is a visible line.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# What `weatherkd restore` tiles with when neither the model nor the user says otherwise. A model
# class sets ``tile`` / ``tile_overlap`` to change it (e.g. the teacher, whose attention cost grows
# with the square of the tile's area).
DEFAULT_TILE, DEFAULT_OVERLAP = 512, 64


def default_tiling(model) -> tuple[int, int]:
    """(tile, overlap) for ``model``: its own ``tile``/``tile_overlap`` attributes, else the defaults."""
    return int(getattr(model, "tile", DEFAULT_TILE)), int(getattr(model, "tile_overlap", DEFAULT_OVERLAP))


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of length ``tile`` covering ``n`` pixels, each overlapping the next by >= ``overlap``."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def ramp_window(n: int, overlap: int, rise: bool, fall: bool) -> torch.Tensor:
    """1-D weights over a tile of length ``n``: 1, except across the first ``overlap`` pixels
    (``rise``) and the last (``fall``): 0 over the outer quarter, a raised cosine over the middle half."""
    w = torch.ones(n, dtype=torch.float32)
    trim = overlap // 4
    ramp = max(overlap - 2 * trim, 1)
    t = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
    up = torch.cat([torch.zeros(trim), 0.5 - 0.5 * torch.cos(math.pi * t)])[:n]
    if overlap > 0 and rise:
        w[:len(up)] = torch.minimum(w[:len(up)], up)
    if overlap > 0 and fall:
        w[n - len(up):] = torch.minimum(w[n - len(up):], up.flip(0))
    return w


@torch.no_grad()
def tiled(model: nn.Module, x: torch.Tensor, tile: int | tuple[int, int] = DEFAULT_TILE,
          overlap: int = DEFAULT_OVERLAP, max_batch: int = 8) -> torch.Tensor:
    """``model(x)`` for a batch ``x`` (B, C, H, W) of any size, run on tiles of at most ``tile``
    (an int or (height, width)) and blended. Tiles of all images go through the model together,
    ``max_batch`` at a time. Images no larger than a tile run whole."""
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    b, _, h, w = x.shape
    if h <= th and w <= tw:
        return model(x)
    if not 0 <= overlap < min(th, tw):
        raise ValueError(f"the tile overlap ({overlap}) must be at least 0 and below the tile ({th}x{tw})")
    th, tw = min(th, h), min(tw, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    wy = {y0: ramp_window(th, overlap, y0 > 0, y0 + th < h) for y0 in ys}
    wx = {x0: ramp_window(tw, overlap, x0 > 0, x0 + tw < w) for x0 in xs}
    out = None
    weight = torch.zeros(1, 1, h, w, device=x.device, dtype=torch.float32)
    positions = [(y0, x0) for y0 in ys for x0 in xs]
    per_call = max(1, max_batch // b)
    for i in range(0, len(positions), per_call):
        chunk = positions[i:i + per_call]
        patches = model(torch.cat([x[..., y0:y0 + th, x0:x0 + tw] for y0, x0 in chunk]))
        if out is None:
            out = torch.zeros(b, patches.shape[1], h, w, device=x.device, dtype=torch.float32)
        for j, (y0, x0) in enumerate(chunk):
            win = (wy[y0][:, None] * wx[x0][None, :]).to(x.device)
            out[..., y0:y0 + th, x0:x0 + tw] += patches[j * b:(j + 1) * b].float() * win
            weight[..., y0:y0 + th, x0:x0 + tw] += win
    return (out / weight).to(x.dtype)
