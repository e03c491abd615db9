"""Exact stand-ins for layers whose ONNX form runs slowly in onnxruntime on the CPU.

``nn.PixelUnshuffle`` exports as Reshape → 6-D Transpose → Reshape and ``nn.PixelShuffle`` as
DepthToSpace; onnxruntime runs both as generic strided copies, and the layout change around them
keeps its NCHWc convolutions from chaining (ReorderInput/ReorderOutput nodes). Profiled on the
tiny demo student at 256² (docs/deployment.md) they were a third of the graph's time. The same
rearrangements written as convolutions with one-hot kernels are exact (each output is one input
times 1 plus zeros) and run as the convolutions around them do.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def _one_hot(channels: int, factor: int, like: torch.Tensor) -> torch.Tensor:
    """(C·f², 1, f, f): output channel c·f² + i·f + j picks pixel (i, j) of input channel c, the
    order ``pixel_unshuffle`` uses. Three ops, not a loop: the exporter traces every op here."""
    f2 = factor * factor
    return torch.eye(f2, dtype=like.dtype, device=like.device).reshape(f2, 1, factor, factor).repeat(channels, 1, 1, 1)


class ConvPixelUnshuffle(nn.Module):
    """``pixel_unshuffle`` as a grouped strided convolution (groups = channels)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, f = x.shape[1], self.factor
        return F.conv2d(x, _one_hot(c, f, x), stride=f, groups=c)


class ConvPixelShuffle(nn.Module):
    """``pixel_shuffle`` as a grouped transposed convolution with the same one-hot kernel."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factor
        c = x.shape[1] // (f * f)
        return F.conv_transpose2d(x, _one_hot(c, f, x), stride=f, groups=c)


def for_export(model: nn.Module, shuffle: bool = True, unshuffle: bool = True) -> nn.Module:
    """A copy of ``model`` with its pixel (un)shuffles replaced; the original is left alone."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        swap = None
        if unshuffle and isinstance(module, nn.PixelUnshuffle):
            swap = ConvPixelUnshuffle(module.downscale_factor)
        elif shuffle and isinstance(module, nn.PixelShuffle):
            swap = ConvPixelShuffle(module.upscale_factor)
        if swap is not None:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, leaf, swap)
    return model
