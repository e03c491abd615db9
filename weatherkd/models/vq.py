"""A small VQ autoencoder for DCKD (docs/references.md): multi-level encoder features for the contrastive
term, and a per-position distribution over the codebook for distribution matching."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weatherkd.models.padding import pad_to_multiple
from weatherkd.models.registry import register


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(1, cout), nn.GELU(),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.GELU())


@register("vq")
class VQAutoencoder(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), codes: int = 256, code_dim: int = 32,
                 temperature: float = 1.0):
        super().__init__()
        widths = tuple(widths)
        self.encoder = nn.ModuleList(_block(3 if i == 0 else widths[i - 1], w, 1 if i == 0 else 2)
                                     for i, w in enumerate(widths))
        self.to_code = nn.Conv2d(widths[-1], code_dim, 1)
        self.codebook = nn.Embedding(codes, code_dim)
        nn.init.uniform_(self.codebook.weight, -1 / codes, 1 / codes)
        self.from_code = nn.Conv2d(code_dim, widths[-1], 1)
        layers = []
        for i in range(len(widths) - 1, 0, -1):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _block(widths[i], widths[i - 1], 1)]
        self.decoder = nn.Sequential(*layers, nn.Conv2d(widths[0], 3, 3, padding=1))
        self.temperature = temperature
        self.multiple = 2 ** (len(widths) - 1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features at every level, plus the pre-quantisation latent (the deepest level)."""
        feats, y = [], x * 2 - 1
        for block in self.encoder:
            y = block(y)
            feats.append(y)
        feats.append(self.to_code(y))
        return feats

    def code_logits(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, codes, H, W): negative squared distances to every code, scaled by the temperature."""
        z = latent.permute(0, 2, 3, 1)
        d = (z.pow(2).sum(-1, keepdim=True) - 2 * z @ self.codebook.weight.t()
             + self.codebook.weight.pow(2).sum(-1))
        return (-d / self.temperature).permute(0, 3, 1, 2)

    def quantize(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.code_logits(latent).argmax(1)
        q = self.codebook(idx).permute(0, 3, 1, 2)
        loss = F.mse_loss(q, latent.detach()) + 0.25 * F.mse_loss(latent, q.detach())
        return latent + (q - latent).detach(), loss  # straight-through

    def forward(self, x: torch.Tensor, return_loss: bool = False):
        xp, (h, w) = pad_to_multiple(x, self.multiple)
        q, vq_loss = self.quantize(self.features(xp)[-1])
        out = ((self.decoder(self.from_code(q)) + 1) / 2)[..., :h, :w]
        return (out, vq_loss) if return_loss else out
