"""A plain residual CNN restorer: the smallest thing worth comparing against, and the engine's test model."""

from __future__ import annotations

import torch
from torch import nn

from weatherkd.models.registry import register


@register("residual_cnn")
class ResidualCNN(nn.Module):
    """DnCNN-style: predicts the weather residual and subtracts it from the input."""

    def __init__(self, width: int = 16, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)
