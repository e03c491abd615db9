"""CLIP towers from open_clip, loaded from local files only, with the taps the teacher needs.

- Image prior: a ViT (ViT-B-32 for real runs); the tap is its final class token.
- Residual features: a modified ResNet (RN50x4); the taps are its stage outputs.
- Text: open_clip's own tokenizer, which works offline (its BPE vocab ships in the package).

With ``allow_random_init`` the towers are random instead: loudly, and recorded by the
caller in model.json and every metrics file. Tiny configs (``wkd-tiny-vit``,
``wkd-tiny-rn``) are registered for tests and the demo.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from weatherkd.errors import UserError
from weatherkd.logs import get_logger
from weatherkd.models import pretrained

log = get_logger(__name__)


@functools.cache
def _open_clip():
    # Imported on first use: open_clip pulls in transformers, timm and torchvision (~5 s on a CPU),
    # which a stage whose model has no CLIP tower (ClipTowerConfig is only its config) never needs.
    import open_clip

    open_clip.add_model_config(Path(__file__).parent / "clip_configs")
    return open_clip

# The RN50x4 stages the CLIP-SRD loss reads (Tan et al. 2024: "stages 1, 3, 4 and 5" = stem, layer2..4).
RN_STAGES = (0, 2, 3, 4)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipTowerConfig:
    name: str = "ViT-B-32"
    # A local open_clip checkpoint of config ``name`` (the state dict open_clip writes, as
    # open_clip_pytorch_model.bin / .pt / open_clip_model.safetensors); never downloaded.
    pretrained: str = ""


def create(cfg: ClipTowerConfig, allow_random_init: bool, key: str) -> tuple[nn.Module, bool]:
    """Build an open_clip model from a local file. Returns (model, random_init)."""
    if cfg.pretrained:
        # Read first (a bad file fails before a big tower is built), then checked against the named
        # config: RN50 weights named RN50x4, or a ViT-B-16 file named ViT-B-32, are one line here.
        state = pretrained.read_state_dict(cfg.pretrained, f"{key}.pretrained")
        model = build_random(cfg.name)
        pretrained.load_into(model, state, f"{key}.pretrained", cfg.pretrained, f"open_clip {cfg.name}")
        return model, False
    if not allow_random_init:
        raise UserError(f"{key}.pretrained is not set: give a local {cfg.name} checkpoint path "
                        f"(nothing is downloaded), or set model.allow_random_init: true for a random tower")
    banner = (f"\n{'!' * 78}\n!! RANDOM CLIP TOWER: {key} ({cfg.name}) has random weights "
              f"(allow_random_init). Results are NOT those of a pretrained CLIP.\n{'!' * 78}")
    log.warning(banner)
    warnings.warn(f"{key}: random {cfg.name} tower (allow_random_init)", stacklevel=2)
    return build_random(cfg.name), True


def _normalise(x: torch.Tensor, size: int) -> torch.Tensor:
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _image_size(visual: nn.Module) -> int:
    size = visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else size


class ImagePrior(nn.Module):
    """The ViT image tower; ``forward`` returns the final-layer class token (B, width)."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.visual = clip_model.visual
        self.size = _image_size(self.visual)
        self.width = self.visual.transformer.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(_normalise(x, self.size), indices=1, output_extra_tokens=True,
                                                intermediates_only=True)
        return out["image_intermediates_prefix"][-1][:, 0]


class ResidualFeatures(nn.Module):
    """The modified-ResNet tower; ``forward`` returns its stage features (stem, layer2, layer3, layer4)."""

    def __init__(self, clip_model: nn.Module, stages=RN_STAGES):
        super().__init__()
        self.visual = clip_model.visual
        self.size = _image_size(self.visual)
        self.stages = list(stages)

    @property
    def channels(self) -> list[int]:
        with torch.no_grad():
            feats = self(torch.zeros(1, 3, 8, 8, device=next(self.parameters()).device))
        return [f.shape[1] for f in feats]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.visual.forward_intermediates(_normalise(x, self.size), indices=max(self.stages) + 1,
                                                intermediates_only=True)
        return [out["image_intermediates"][i] for i in self.stages]


@torch.no_grad()
def text_features(clip_model: nn.Module, name: str, prompts: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings of ``prompts``, tokenised offline."""
    tokens = _open_clip().get_tokenizer(name)(prompts)
    return F.normalize(clip_model.encode_text(tokens).float(), dim=-1)


def weather_prompts(weathers: list[str]) -> list[str]:
    return [f"An image with {w.replace('_', ' and ')}" for w in weathers]


def build_random(name: str) -> nn.Module:
    """An open_clip model of config ``name`` with random weights, to be filled by a state dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import logging

        quiet = logging.getLogger()
        level, quiet.level = quiet.level, logging.ERROR  # open_clip logs "initialized randomly" at WARNING
        try:
            open_clip = _open_clip()
            if name not in open_clip.list_models():
                raise UserError(f"'{name}' is not an open_clip model config (e.g. ViT-B-32-quickgelu, "
                                f"RN50x4-quickgelu; `open_clip.list_models()` has them all)")
            return open_clip.create_model(name, pretrained=None)
        finally:
            quiet.level = level
