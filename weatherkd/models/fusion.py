"""Frozen copies of a model for forwards inside a training step, where nothing needs a gradient:
batch norm folded into the convolution before it, weights in the compute dtype (no autocast casts
per call). The same function of the input up to the rounding of that dtype."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Every ``Conv2d`` directly followed by a ``BatchNorm2d`` in a ``Sequential`` becomes one
    convolution (eval-mode statistics), in place; returns ``module``."""
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq[i], seq[i + 1] = fuse_conv_bn_eval(conv.eval(), bn.eval()), nn.Identity()
    return module


@torch.no_grad()
def frozen_copy(module: nn.Module, dtype: torch.dtype, channels_last: bool = False) -> nn.Module:
    out = fold_batchnorm(copy.deepcopy(module).eval()).to(dtype).requires_grad_(False)
    return out.to(memory_format=torch.channels_last) if channels_last else out
