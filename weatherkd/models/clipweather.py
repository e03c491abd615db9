"""The CLIP-guided multi-weather teacher (Tan et al. 2024) and its TransWeather-style baseline.

- SAR encoder: four hierarchical transformer stages (strided-conv patch embedding,
  efficient attention with K/V reduced by a strided conv) whose FFN (SARFFN) adds a
  spatially-adaptive residual: K depthwise kernels mixed per pixel by weights that
  cheap convs predict from the features (K = 3, one per weather).
- CWP embedding: cross-attention from the bottleneck tokens to
  [CLIP prior tokens ; learnable prior tokens], mixed by a learnable weight. The CLIP
  prior is the ViT class token through two linear layers.
- Decoder: a conv decoder over the multi-scale encoder features; the net predicts a
  residual that is added to the input.

``ClipWeatherNet`` is what trains (the frozen CLIP tower stays outside it, and outside
``accelerator.prepare``). ``ClipWeather`` bundles net + tower for export and inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from weatherkd.models.padding import pad_to_multiple
from weatherkd.models.registry import register

SIZES = {
    # dims per stage, blocks per stage, heads per stage, K/V reduction per stage, CWP blocks, prior tokens
    "tiny": dict(dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), heads=(1, 1, 2, 2), sr=(4, 2, 2, 1),
                 cwp_blocks=1, prior_tokens=4, mlp_ratio=2, decoder=16),
    "small": dict(dims=(32, 64, 128, 192), depths=(1, 2, 2, 1), heads=(1, 2, 4, 4), sr=(8, 4, 2, 1),
                  cwp_blocks=1, prior_tokens=8, mlp_ratio=4, decoder=32),
    # About the paper's 126M total minus the ViT-B/32 image tower (~88M): ~38M.
    "base": dict(dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), heads=(1, 2, 5, 8), sr=(8, 4, 2, 1),
                 cwp_blocks=2, prior_tokens=16, mlp_ratio=4, decoder=64),
}
PAD_MULTIPLE = 32  # total stride of the encoder


class EfficientAttention(nn.Module):
    """Multi-head attention whose keys/values come from a map downsampled by a strided conv."""

    def __init__(self, dim: int, heads: int, sr: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reduce = nn.Sequential(nn.Conv2d(dim, dim, sr, sr), nn.GroupNorm(1, dim)) if sr > 1 else None

    def forward(self, x: torch.Tensor, h: int, w: int, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        if context is None:
            context = x
            if self.reduce is not None:
                context = self.reduce(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        q = self.q(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        k, v = self.kv(context).view(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SpatiallyAdaptiveResidual(nn.Module):
    """K depthwise 3×3 kernels, mixed per pixel by softmax weights predicted from the features."""

    def __init__(self, dim: int, kernels: int = 3):
        super().__init__()
        self.kernels = kernels
        self.bank = nn.Conv2d(dim, dim * kernels, 3, padding=1, groups=dim)
        self.mixer = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.GELU(),
                                   nn.Conv2d(dim, kernels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        responses = self.bank(x).view(b, c, self.kernels, h, w)
        weights = self.mixer(x).softmax(dim=1)
        return (responses * weights[:, None]).sum(2)


class SARFFN(nn.Module):
    """Mix-FFN (linear, depthwise conv, GELU, linear) plus the spatially-adaptive residual branch."""

    def __init__(self, dim: int, ratio: int, sar: bool, kernels: int = 3):
        super().__init__()
        hidden = dim * ratio
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.sar = SpatiallyAdaptiveResidual(dim, kernels) if sar else None

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The FFN output and the SAR residual map (what the CLIP-SRD loss reads), or None without SAR."""
        b, n, c = x.shape
        y = self.fc1(x).transpose(1, 2).reshape(b, -1, h, w)
        y = self.fc2(F.gelu(self.dw(y)).flatten(2).transpose(1, 2))
        if self.sar is None:
            return y, None
        r = self.sar(x.transpose(1, 2).reshape(b, c, h, w))
        return y + r.flatten(2).transpose(1, 2), r


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int, ratio: int, sar: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = EfficientAttention(dim, heads, sr)
        self.ffn = SARFFN(dim, ratio, sar)

    def forward(self, x, h, w) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.norm1(x), h, w)
        y, residual = self.ffn(self.norm2(x), h, w)
        return x + y, residual


class EncoderStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, sr: int, ratio: int, sar: bool, first: bool):
        super().__init__()
        k, s = (7, 4) if first else (3, 2)
        self.embed = nn.Conv2d(in_dim, dim, k, s, padding=k // 2)
        self.embed_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, sr, ratio, sar) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stage's features and its last block's SAR residual map (None without SAR)."""
        x = self.embed(x)
        b, c, h, w = x.shape
        t = self.embed_norm(x.flatten(2).transpose(1, 2))
        residual = None
        for block in self.blocks:
            t, residual = block(t, h, w)
        return self.norm(t).transpose(1, 2).reshape(b, c, h, w), residual


class CWPBlock(nn.Module):
    """Cross-attention from image tokens to prior tokens, then an FFN."""

    def __init__(self, dim: int, heads: int, ratio: int):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = EfficientAttention(dim, heads, 1)
        self.ffn = nn.Sequential(nn.Linear(dim, dim * ratio), nn.GELU(), nn.Linear(dim * ratio, dim))

    def forward(self, x, h, w, prior_tokens):
        x = x + self.attn(self.norm_q(x), h, w, context=self.norm_kv(prior_tokens))
        return x + self.ffn(self.norm2(x))


def conv_norm(cin: int, cout: int, norm: str) -> list[nn.Module]:
    """A 3×3 conv, then BatchNorm when ``norm`` is "batch"."""
    return [nn.Conv2d(cin, cout, 3, padding=1)] + ([nn.BatchNorm2d(cout)] if norm == "batch" else [])


class DecoderStep(nn.Module):
    def __init__(self, in_dim: int, skip_dim: int, out_dim: int, norm: str = "none"):
        super().__init__()
        self.conv = nn.Sequential(*conv_norm(in_dim + skip_dim, out_dim, norm), nn.GELU(),
                                  *conv_norm(out_dim, out_dim, norm), nn.GELU())

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], 1))


class ResidualConv(nn.Module):
    def __init__(self, dim: int, norm: str = "none"):
        super().__init__()
        self.body = nn.Sequential(*conv_norm(dim, dim, norm), nn.GELU(), *conv_norm(dim, dim, norm))

    def forward(self, x):
        return x + self.body(x)


class ClipWeatherNet(nn.Module):
    """The trainable part of the teacher. ``prior`` is the CLIP ViT class token (B, prior_dim)."""

    # Layers whose output channels structured pruning must keep: attention splits channels into
    # heads, the SAR bank views its output as K kernels per channel, stage embeddings set the width
    # attention runs at, and the prior/text projections meet the frozen CLIP tower.
    prune_keep = ("*.embed", "*.attn.*", "*.sar.*", "prior_*", "text_proj")

    def __init__(self, size: str = "tiny", prior_dim: int = 768, text_dim: int = 512, use_clip_prior: bool = True,
                 sar: bool = True, sar_kernels: int = 3, decoder_norm: str = "none"):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"unknown clipweather size '{size}'; sizes: {', '.join(SIZES)}")
        if decoder_norm not in ("none", "batch"):
            raise ValueError(f"decoder_norm must be 'none' or 'batch', not '{decoder_norm}'")
        s = SIZES[size]
        dims = s["dims"]
        self.use_clip_prior = use_clip_prior
        self.stages = nn.ModuleList(
            EncoderStage(3 if i == 0 else dims[i - 1], dims[i], s["depths"][i], s["heads"][i], s["sr"][i],
                         s["mlp_ratio"], sar, first=i == 0)
            for i in range(4)
        )
        d4, m = dims[3], s["prior_tokens"]
        self.learned_prior = nn.Parameter(torch.randn(m, d4) * 0.02)
        if use_clip_prior:
            # Two linear layers take the class token to prior tokens. The text-classification loss
            # reads the first one's output, so it shapes what the CWP tokens carry about the weather.
            self.prior_embed = nn.Sequential(nn.Linear(prior_dim, d4), nn.GELU())
            self.prior_tokens = nn.Linear(d4, m * d4)
            # Shape (1,), not (): DeepSpeed broadcasts parameters as bytes, which a 0-dim tensor cannot be viewed as.
            self.prior_mix = nn.Parameter(torch.zeros(1))  # sigmoid(0) = an even mix at the start
            self.text_proj = nn.Linear(d4, text_dim)
            self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.cwp = nn.ModuleList(CWPBlock(d4, s["heads"][3], s["mlp_ratio"]) for _ in range(s["cwp_blocks"]))
        dec = s["decoder"]
        n = decoder_norm
        self.up3 = DecoderStep(dims[3], dims[2], dims[2], n)
        self.up2 = DecoderStep(dims[2], dims[1], dims[1], n)
        self.up1 = DecoderStep(dims[1], dims[0], max(dims[0], dec), n)
        # A full-resolution path: the encoder starts at stride 4, and streaks and drop edges are finer.
        self.stem = nn.Sequential(*conv_norm(3, dec, n), nn.GELU())
        self.head = nn.Sequential(*conv_norm(max(dims[0], dec) + dec, dec, n), nn.GELU(),
                                  ResidualConv(dec, n), ResidualConv(dec, n), nn.Conv2d(dec, 3, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # start as the identity: output = input
        nn.init.zeros_(self.head[-1].bias)

    def _prior_tokens(self, embedded: torch.Tensor | None, batch: int) -> torch.Tensor:
        learned = self.learned_prior.expand(batch, -1, -1)
        if embedded is None:
            return learned
        clip_tokens = self.prior_tokens(embedded).view(batch, -1, learned.shape[-1])
        a = torch.sigmoid(self.prior_mix)
        return torch.cat([a * clip_tokens, (1 - a) * learned], dim=1)

    def forward(self, x: torch.Tensor, prior: torch.Tensor | None = None, return_aux: bool = False):
        padded, (h, w) = pad_to_multiple(x, PAD_MULTIPLE, mode="reflect")
        feats, residual_maps, t = [], [], padded
        for stage in self.stages:
            t, residual = stage(t)
            feats.append(t)
            residual_maps.append(residual)
        b, c, h4, w4 = feats[3].shape
        tokens = feats[3].flatten(2).transpose(1, 2)
        embedded = None
        if self.use_clip_prior:
            if prior is None:
                raise ValueError("this clipweather net needs the CLIP prior (class token); pass prior=")
            embedded = self.prior_embed(prior)
        kv = self._prior_tokens(embedded, b)
        for block in self.cwp:
            tokens = block(tokens, h4, w4, kv)
        y = tokens.transpose(1, 2).reshape(b, c, h4, w4)
        y = self.up1(self.up2(self.up3(y, feats[2]), feats[1]), feats[0])
        y = F.interpolate(y, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        out = (padded + self.head(torch.cat([y, self.stem(padded)], 1)))[..., :h, :w]
        if not return_aux:
            return out
        aux = {"residual_maps": residual_maps}
        if embedded is not None:
            aux["prior_embedding"] = F.normalize(self.text_proj(embedded).float(), dim=-1)
            aux["logit_scale"] = self.logit_scale.exp().clamp(max=100)
        return out, aux


register("clipweather_net")(ClipWeatherNet)


@register("transweather")
def transweather(size: str = "tiny", decoder_norm: str = "none") -> ClipWeatherNet:
    """The baseline without any CLIP part (no prior, no SAR residual): measures what CLIP adds."""
    return ClipWeatherNet(size=size, use_clip_prior=False, sar=False, decoder_norm=decoder_norm)


@register("clipweather")
class ClipWeather(nn.Module):
    """Net + frozen CLIP image tower: the exported teacher, runnable on images alone.

    With ``weathers``, it also carries the CLIP text features of one prompt per weather
    (``weather_text``), so the teacher classifies weather on its own: ``weather_logits``.
    """

    def __init__(self, net: dict, clip_image: str, weathers: list[str] | None = None):
        super().__init__()
        from weatherkd.models.clip import ImagePrior, build_random

        self.net = ClipWeatherNet(**net)
        self.prior = ImagePrior(build_random(clip_image))  # weights come from model.safetensors
        self.prior.requires_grad_(False)
        self.weathers = list(weathers or [])
        if self.weathers:
            self.register_buffer("weather_text", torch.zeros(len(self.weathers), self.net.text_proj.out_features))

    # Pruning and inversion read these instead of testing for this class: only ``net`` was trained
    # (and is pruned), fed ``net_inputs(x)``; ``forward_with_weather`` is differentiable end to end.
    trained_part = "net"

    def net_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.prior(x).detach()

    def load_parts(self, net_state: dict, prior_state: dict, weather_text: torch.Tensor | None = None) -> None:
        """The trained net, the CLIP tower it was trained with and (with ``weathers``) the weather
        prompts' text features; strict, so a part that does not fit fails here, not at load time."""
        self.net.load_state_dict(net_state)
        self.prior.load_state_dict(prior_state)
        if self.weathers:
            if weather_text is None:
                raise ValueError("a clipweather model with weathers needs their text features")
            self.weather_text.copy_(weather_text)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            prior = self.prior(x)
        return self.net(x, prior)

    def forward_with_weather(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output and weather logits (B, len(weathers)), or None without weather text features;
        unlike ``forward``, differentiable w.r.t. ``x`` through the CLIP tower too (teacher inversion)."""
        out, aux = self.net(x, self.prior(x), return_aux=True)
        if not self.weathers or "prior_embedding" not in aux:
            return out, None
        return out, aux["logit_scale"] * aux["prior_embedding"] @ self.weather_text.T
