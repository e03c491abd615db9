"""`weatherkd teacher`: train the CLIP-guided weather-removal teacher (papers/003) on paired shards.

``model.arch``:
- ``clipweather``: SAR encoder + CWP embedding with the frozen CLIP ViT prior; losses may add
  text classification and CLIP-SRD (frozen CLIP ResNet residual features).
- ``transweather``: the same backbone without any CLIP part, to measure what CLIP adds.
- any other registered restorer (e.g. ``residual_cnn``), trained with the image losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from weatherkd import models
from weatherkd.config import ModelConfig, StageConfig, register_stage_config
from weatherkd.data.shards import open_set
from weatherkd.engine import Engine, FeatureStatsConfig, Recipe
from weatherkd.losses import restoration as L
from weatherkd.models import clip


@dataclass
class ClipConfig:
    image: clip.ClipTowerConfig = field(default_factory=lambda: clip.ClipTowerConfig("ViT-B-32"))
    residual: clip.ClipTowerConfig = field(default_factory=lambda: clip.ClipTowerConfig("RN50x4"))


@dataclass
class TeacherModelConfig(ModelConfig):
    arch: str = "clipweather"
    clip: ClipConfig = field(default_factory=ClipConfig)


@dataclass
class LossConfig:
    pixel: Literal["smooth_l1", "l1", "l2"] = "smooth_l1"
    w_pixel: float = 1.0
    w_ssim: float = 0.0
    w_psnr: float = 0.0
    w_perceptual: float = 0.0
    vgg_weights: str = ""  # local VGG16 weights (torchvision layout); required when w_perceptual > 0
    w_text: float = 0.0  # clipweather only
    w_srd: float = 0.0  # clipweather only
    srd_start: int = 0  # optimizer step at which CLIP-SRD switches on (the paper: epoch 200 of 250)


@register_stage_config("teacher")
@dataclass
class Config(StageConfig):
    out_dir: str = "runs/teacher"
    model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Feature statistics recorded on the training data at export: `weatherkd dream`'s targets.
    stats: FeatureStatsConfig = field(default_factory=FeatureStatsConfig)


class TeacherRecipe(Recipe):
    def __init__(self, cfg: Config):
        self.cfg, m, loss = cfg, cfg.model, cfg.loss
        self.weathers = open_set(cfg.data.train_shards).weathers
        self.pixel = L.PIXEL[loss.pixel]
        frozen, self.text_features = {}, None
        random_init = False
        if m.arch == "clipweather":
            image_model, random_init = clip.create(m.clip.image, m.allow_random_init, "model.clip.image")
            frozen["clip_image"] = clip.ImagePrior(image_model)
            if loss.w_text > 0:
                self.text_features = clip.text_features(image_model, m.clip.image.name,
                                                        clip.weather_prompts(self.weathers))
            if loss.w_srd > 0:
                rn_model, rn_random = clip.create(m.clip.residual, m.allow_random_init, "model.clip.residual")
                frozen["clip_residual"] = clip.ResidualFeatures(rn_model)
                random_init = random_init or rn_random
            text_dim = image_model.text_projection.shape[1] if hasattr(image_model, "text_projection") else 512
            net = models.build("clipweather_net", size=m.size, prior_dim=frozen["clip_image"].width,
                               text_dim=int(text_dim), **m.kwargs)
        else:
            if loss.w_text > 0 or loss.w_srd > 0:
                raise ValueError(f"loss.w_text and loss.w_srd need model.arch: clipweather, not '{m.arch}'")
            net = models.build(m.arch, **({"size": m.size} if m.arch == "transweather" else {}), **m.kwargs)
        if loss.w_perceptual > 0:
            frozen["vgg"] = L.Perceptual(loss.vgg_weights)
        super().__init__(net, frozen)
        self.random_init = random_init
        self.feature_stats = cfg.stats

    @torch.no_grad()
    def clip_prior(self, x: torch.Tensor) -> torch.Tensor | None:
        tower = self.frozen.get("clip_image")
        return tower(x) if tower is not None else None

    def step(self, model, batch, step):
        x, y, w = batch["input"], batch["target"], self.cfg.loss
        prior = self.clip_prior(x)
        if prior is not None:
            out, aux = model(x, prior, return_aux=True)
        else:
            out, aux = model(x), {}
        losses = {"pixel": w.w_pixel * self.pixel(out, y)}
        if w.w_ssim:
            losses["ssim"] = w.w_ssim * L.ssim_loss(out.float(), y.float())
        if w.w_psnr:
            losses["psnr"] = w.w_psnr * L.psnr_loss(out.float(), y.float())
        if w.w_perceptual:
            losses["perceptual"] = w.w_perceptual * self.frozen["vgg"](out, y)
        if w.w_text and "prior_embedding" in aux:
            losses["text"] = w.w_text * L.text_classification(aux["prior_embedding"], self.text_features.to(x.device),
                                                              aux["logit_scale"], batch["weather_soft"])
        if w.w_srd and step >= w.srd_start:
            with torch.no_grad():
                rn = self.frozen["clip_residual"]
                weather_feats, clean_feats = rn(x), rn(y)
            losses["srd"] = w.w_srd * L.srd_loss(aux["residual_maps"], weather_feats, clean_feats)
        losses["loss"] = sum(losses.values())
        return losses

    def predict(self, model, batch):
        x = batch["input"]
        prior = self.clip_prior(x)
        return model(x, prior) if prior is not None else model(x)

    def export_model(self, model, state):
        """Export net + CLIP image tower as one ``clipweather`` model that runs on images alone."""
        if "clip_image" not in self.frozen:
            return model, state
        tower = self.frozen["clip_image"]
        bundle_kwargs = {"net": model.weatherkd_spec["kwargs"], "clip_image": self.cfg.model.clip.image.name}
        merged = {f"net.{k}": v for k, v in state.items()}
        merged.update({f"prior.{k}": v for k, v in tower.state_dict().items()})
        if self.text_features is not None:  # the teacher's own weather classifier, for `weatherkd dream`
            bundle_kwargs["weathers"] = self.weathers
            merged["weather_text"] = self.text_features.float().cpu()
        bundle = torch.nn.Module()
        bundle.weatherkd_spec = {"arch": "clipweather", "kwargs": bundle_kwargs}
        return bundle, merged


RECIPE = TeacherRecipe  # what `weatherkd bench step` builds for this stage


def run(cfg: Config) -> int:
    Engine(cfg, RECIPE).fit()
    return 0
