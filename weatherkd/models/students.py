"""Compact students: a BatchNorm U-Net (its BN statistics are what data-free inversion matches)
and a NAFNet-style block net. Both predict a residual that is added to the input, and both work
at half resolution behind a pixel (un)shuffle: full-resolution convs would dominate their FLOPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weatherkd.models.padding import pad_to_multiple
from weatherkd.models.registry import register

UNET_SIZES = {"tiny": (8, 12, 16), "small": (24, 32, 64), "base": (48, 64, 128)}
# width, blocks per encoder level, middle blocks. The allweather students (configs/distill/allweather*.yaml):
# "large" has DCKD's student/teacher parameter ratio (3.8M/26.1M) against the clipweather teacher
# (19.2M vs 127.8M), "medium" about 1/10 of its FLOPs (5.0 vs 51.5 GFLOPs at 256²).
NAF_SIZES = {"tiny": (8, (1, 1, 1), 1), "small": (24, (1, 1, 2), 2), "base": (48, (2, 2, 4), 4),
             "medium": (44, (1, 1, 2), 2), "large": (32, (2, 2, 4, 8), 5)}


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@register("unet_bn")
class UNetBN(nn.Module):
    def __init__(self, size: str = "tiny"):
        super().__init__()
        c1, c2, c3 = UNET_SIZES[size]
        self.enc1 = nn.Sequential(nn.PixelUnshuffle(2), ConvBNAct(12, c1), ConvBNAct(c1, c1))
        self.enc2 = nn.Sequential(ConvBNAct(c1, c2, 2), ConvBNAct(c2, c2))
        self.mid = nn.Sequential(ConvBNAct(c2, c3, 2), ConvBNAct(c3, c3))
        self.dec2 = nn.Sequential(ConvBNAct(c3 + c2, c2), ConvBNAct(c2, c2))
        self.dec1 = nn.Sequential(ConvBNAct(c2 + c1, c1), ConvBNAct(c1, c1))
        self.out = nn.Sequential(nn.Conv2d(c1, 12, 3, padding=1), nn.PixelShuffle(2))
        nn.init.zeros_(self.out[0].weight)
        nn.init.zeros_(self.out[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, (h, w) = pad_to_multiple(x, 8)
        e1 = self.enc1(xp)
        e2 = self.enc2(e1)
        m = self.mid(e2)
        d2 = self.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:], mode="bilinear", align_corners=False), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="bilinear", align_corners=False), e1], 1))
        return (xp + self.out(d1))[..., :h, :w]


class LayerNorm2d(nn.GroupNorm):
    def __init__(self, c: int):
        super().__init__(1, c)


class NAFBlock(nn.Module):
    """NAFNet's block: LayerNorm, pointwise + depthwise conv, SimpleGate, simplified channel attention."""

    def __init__(self, c: int):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm2d(c), LayerNorm2d(c)
        self.pw1 = nn.Conv2d(c, 2 * c, 1)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1))
        self.pw2 = nn.Conv2d(c, c, 1)
        self.ffn1, self.ffn2 = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(c, c, 1)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    @staticmethod
    def gate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b

    def forward(self, x):
        y = self.gate(self.dw(self.pw1(self.norm1(x))))
        x = x + self.beta * self.pw2(y * self.sca(y))
        return x + self.gamma * self.ffn2(self.gate(self.ffn1(self.norm2(x))))


@register("nafnet")
class NAFNetSmall(nn.Module):
    def __init__(self, size: str = "tiny"):
        super().__init__()
        width, enc_blocks, mid_blocks = NAF_SIZES[size]
        self.intro = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, width, 3, padding=1))
        self.encoders, self.downs, self.ups, self.decoders = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c = width
        for n in enc_blocks:
            self.encoders.append(nn.Sequential(*[NAFBlock(c) for _ in range(n)]))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, 2))
            c *= 2
        self.middle = nn.Sequential(*[NAFBlock(c) for _ in range(mid_blocks)])
        for n in reversed(enc_blocks):
            self.ups.append(nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.PixelShuffle(2)))
            c //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(c) for _ in range(n)]))
        self.ending = nn.Sequential(nn.Conv2d(width, 12, 3, padding=1), nn.PixelShuffle(2))
        self.multiple = 2 ** (len(enc_blocks) + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, (h, w) = pad_to_multiple(x, self.multiple)
        y, skips = self.intro(xp), []
        for enc, down in zip(self.encoders, self.downs):
            y = enc(y)
            skips.append(y)
            y = down(y)
        y = self.middle(y)
        for dec, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            y = dec(up(y) + skip)
        return (xp + self.ending(y))[..., :h, :w]
