"""Restoration losses of the teacher (Tan et al. 2024 §III-E): pixel, SSIM, PSNR, perceptual (VGG),
text-prompt classification and CLIP soft residual distillation (CLIP-SRD)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weatherkd.errors import UserError
from weatherkd.models import pretrained
from weatherkd.metrics import gaussian_window

PIXEL = {"smooth_l1": F.smooth_l1_loss, "l1": F.l1_loss, "l2": F.mse_loss}


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Differentiable per-image SSIM on [0, 1] images (11×11 Gaussian, σ 1.5, valid region)."""
    c = pred.shape[1]
    window = gaussian_window(device=pred.device).to(pred.dtype).expand(c, 1, 11, 11)

    def blur(x):
        return F.conv2d(x, window, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_p, mu_t = blur(pred), blur(target)
    var_p, var_t = blur(pred * pred) - mu_p**2, blur(target * target) - mu_t**2
    cov = blur(pred * target) - mu_p * mu_t
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return ssim_map.flatten(1).mean(1)


def ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 1 - ssim(pred, target).mean()


def psnr_loss(pred: torch.Tensor, target: torch.Tensor, ceiling_db: float = 40.0) -> torch.Tensor:
    """Minus the mean per-image PSNR for data range 1 (scaled down by 10 so its gradients sit near L1's),
    saturating near ``ceiling_db``. Without a ceiling, an image the model already returns almost
    exactly (a clean training pair) has a gradient that grows without bound as its error shrinks:
    with clean pairs in the data, that term drowned every other one, and a teacher trained to
    return its input unchanged, exactly, weather and all."""
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(mse + 10 ** (-ceiling_db / 10))).mean() / 10


def keep_loss(pred: torch.Tensor, degraded: torch.Tensor, target: torch.Tensor, tol: float = 1 / 255) -> torch.Tensor:
    """L1 between the output and the input where the weather changed nothing (input = target to
    within ``tol`` in every channel), over all pixels. MSE-like pixel losses barely pull on the small
    changes a model makes to such pixels (their gradient shrinks with the error), so a model
    trained on them alone brightens and hazes clean photos and the clean parts of a raindrop
    photo; L1's pull does not shrink."""
    unchanged = ((degraded - target).abs().amax(1, keepdim=True) <= tol).to(pred.dtype)
    return ((pred - degraded).abs() * unchanged).mean()


def soft_cross_entropy(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft labels (CutMix mixes two weathers by area)."""
    return -(soft_labels * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def text_classification(prior_embedding: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                        soft_labels: torch.Tensor) -> torch.Tensor:
    """CE over cosine similarities to the CLIP text features of "An image with {weather}"."""
    logits = logit_scale * prior_embedding @ text_features.to(prior_embedding.dtype).t()
    return soft_cross_entropy(logits, soft_labels)


def channel_pool(x: torch.Tensor, width: int) -> torch.Tensor:
    """Average groups of channels down to ``width`` channels (adaptive when they don't divide)."""
    b, c, h, w = x.shape
    if c == width:
        return x
    pooled = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(b * h * w, 1, c), width)
    return pooled.view(b, h, w, width).permute(0, 3, 1, 2)


def _standardise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit variance per sample: compares the shape of two maps, not their scale."""
    flat = x.flatten(1)
    return ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + eps)).view_as(x)


def srd_loss(residual_maps: list[torch.Tensor], clip_weather: list[torch.Tensor],
             clip_clean: list[torch.Tensor]) -> torch.Tensor:
    """CLIP-SRD: normalised L1 between each SAR residual map and CLIP(weather) − CLIP(clean),
    channel-pooled to the smaller width and resized to the SAR map's resolution."""
    total = 0.0
    for sar, fw, fc in zip(residual_maps, clip_weather, clip_clean):
        clip_res = (fw - fc).float()
        width = min(sar.shape[1], clip_res.shape[1])
        clip_res = F.interpolate(channel_pool(clip_res, width), size=sar.shape[-2:], mode="bilinear",
                                 align_corners=False)
        total = total + (_standardise(channel_pool(sar.float(), width)) - _standardise(clip_res)).abs().mean()
    return total / len(residual_maps)


class Perceptual(nn.Module):
    """L1 between VGG16 features (up to relu3_3) of prediction and target. Weights from a local file."""

    LAYERS = 16  # features[:16] ends at relu3_3
    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, weights: str, key: str = "loss.vgg_weights"):
        super().__init__()
        import torchvision

        path = Path(weights) if weights else None
        if path is None or not path.is_file():
            raise UserError(f"{key}: the perceptual loss needs local VGG16 weights "
                            f"({'not set' if path is None else f'file not found: {path}'}); nothing is downloaded")
        self.features = torchvision.models.vgg16().features[: self.LAYERS]
        # torchvision's file (features.* + classifier.*) or the features alone; what is used must be VGG16's.
        state = {k.removeprefix("features."): v for k, v in pretrained.read_state_dict(path, key).items()}
        state = {k: v for k, v in state.items() if k.split(".")[0].isdigit()}  # VGG's numbered feature layers
        state = {k: v for k, v in state.items() if int(k.split(".")[0]) < self.LAYERS}
        pretrained.check_fits(self.features.state_dict(), state, key, path, "torchvision VGG16")
        self.features.load_state_dict(state)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_features = self.features((target - self.mean) / self.std)
        return F.l1_loss(self.features((pred - self.mean) / self.std), target_features)
