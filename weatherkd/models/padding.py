"""Padding an image batch up to a network's total stride, and the crop back."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "replicate") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the bottom and right of ``x`` to multiples of ``multiple``; returns it and the original
    (h, w). ``mode="reflect"`` reflects where the image is large enough and replicates otherwise
    (reflection cannot pad by more than the image's own size)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if mode == "reflect" and not (ph < h and pw < w):
        mode = "replicate"
    # Padded even by zero pixels: a branch on the size would be frozen into an exported graph
    # (ONNX, torch.export) at the example input's size.
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)
