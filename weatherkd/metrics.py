"""PSNR and SSIM under named protocols. One implementation (batched torch, float64) serves training-time
validation and `weatherkd eval`; the uint8 H×W×3 wrappers are what papers and tests compare against.

Protocols:
- ``rgb``: all three channels, float64, data range 255.
- ``y``: BT.601 luma in 16–235 computed from [0, 1] RGB, as BasicSR does; SSIM
  with an 11×11 Gaussian window, σ = 1.5, on the valid region.

Predictions are quantised to uint8 first, exactly as if they had been saved as
PNG, so validation during training and offline evaluation agree.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PROTOCOLS = ("rgb", "y")
_BT601 = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float (B, 3, H, W) -> float64 on the 0..255 integer grid."""
    return (x.detach().double().clamp(0, 1) * 255).round()


def _prepare(x: torch.Tensor, protocol: str, crop_border: int) -> torch.Tensor:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}'; use one of {PROTOCOLS}")
    if protocol == "y":
        x = torch.einsum("bchw,c->bhw", x / 255.0, _BT601.to(x.device))[:, None] + 16.0
    if crop_border:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
    return x


def psnr_batch(pred: torch.Tensor, target: torch.Tensor, protocol: str = "rgb", crop_border: int = 0) -> torch.Tensor:
    """Per-image PSNR (dB) of quantised predictions; inputs are (B, 3, H, W) in [0, 1]."""
    a = _prepare(quantize(pred), protocol, crop_border)
    b = _prepare(quantize(target), protocol, crop_border)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))


def weather_split(pred: torch.Tensor, inp: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image, the squared errors (0..255 grid, summed over pixels and channels) where the
    weather changed the image (input and target differ in some channel) and where it left it
    exact. A change in PSNR is then either removal (the model's error on weather pixels against
    the input's) or damage (any error on untouched pixels, where the input is the target)."""
    p, x, t = quantize(pred), quantize(inp), quantize(target)
    weather = ((x - t).abs().amax(1) > 0).double()  # (B, H, W)
    se, se_input = ((p - t) ** 2).sum(1), ((x - t) ** 2).sum(1)
    channels = pred.shape[1]
    return {"se_weather": (se * weather).flatten(1).sum(1), "se_weather_input": (se_input * weather).flatten(1).sum(1),
            "se_untouched": (se * (1 - weather)).flatten(1).sum(1),
            "weather_values": weather.flatten(1).sum(1) * channels,
            "untouched_values": (1 - weather).flatten(1).sum(1) * channels}


def gaussian_1d(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    g = gaussian_1d(size, sigma, device)
    return torch.outer(g, g)


def gaussian_blur_valid(x: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Depthwise Gaussian blur over the valid region, as two 1-D passes: the same sums as the 2-D
    window, ~40× faster in float64 on CPU, where a 2-D double depthwise conv takes a slow path."""
    c = x.shape[1]
    g = gaussian_1d(size, sigma, x.device).to(x.dtype)
    x = F.conv2d(x, g.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)


def ssim_batch(pred: torch.Tensor, target: torch.Tensor, protocol: str = "rgb", crop_border: int = 0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004; 11×11 Gaussian, σ 1.5, valid region, mean over channels)."""
    a = _prepare(quantize(pred), protocol, crop_border)
    b = _prepare(quantize(target), protocol, crop_border)
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11×11 pixels, got {tuple(a.shape[-2:])}")
    blur = gaussian_blur_valid
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)


def _as_batch(img: np.ndarray) -> torch.Tensor:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 H×W×3 array, got {img.dtype} {img.shape}")
    return torch.from_numpy(img.astype(np.float64) / 255.0).permute(2, 0, 1)[None]


def psnr(a: np.ndarray, b: np.ndarray, protocol: str = "rgb", crop_border: int = 0) -> float:
    """PSNR of two uint8 H×W×3 images."""
    return float(psnr_batch(_as_batch(a), _as_batch(b), protocol, crop_border)[0])


def ssim(a: np.ndarray, b: np.ndarray, protocol: str = "rgb", crop_border: int = 0) -> float:
    """SSIM of two uint8 H×W×3 images."""
    return float(ssim_batch(_as_batch(a), _as_batch(b), protocol, crop_border)[0])
