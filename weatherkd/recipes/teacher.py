"""`weatherkd teacher`: train the CLIP-guided weather-removal teacher (Tan et al. 2024) on paired shards.

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
from weatherkd.config import ModelConfig, StageConfig
from weatherkd.errors import UserError
from weatherkd.data.shards import open_set
from weatherkd.data.stream import TrainSpec, train_loader
from weatherkd.engine import Engine, Recipe
from weatherkd.logs import get_logger
from weatherkd.losses import restoration as L
from weatherkd.models import clip, feature_stats
from weatherkd.precision import Helper

log = get_logger(__name__)


@dataclass
class FeatureStatsConfig:
    """Per-layer feature statistics to record on the training data once the teacher is exported:
    what `weatherkd dream` inverts towards: the transformer teacher has BatchNorm at most in its
    decoder (models/feature_stats.py)."""

    batches: int = 16  # per rank; 0: record nothing
    layers: list[str] = field(default_factory=lambda: ["*"])  # globs over normalisation layers, or exact names


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
    w_keep: float = 0.0  # L1 to the input where the weather changed nothing (losses.restoration.keep_loss)
    w_perceptual: float = 0.0
    vgg_weights: str = ""  # local VGG16 weights (torchvision layout); required when w_perceptual > 0
    w_text: float = 0.0  # clipweather only
    w_srd: float = 0.0  # clipweather only
    srd_start: int = 0  # optimizer step at which CLIP-SRD switches on (the paper: epoch 200 of 250)


@dataclass
class Config(StageConfig):
    out_dir: str = "runs/teacher"
    model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Feature statistics recorded on the training data at export: `weatherkd dream`'s targets.
    stats: FeatureStatsConfig = field(default_factory=FeatureStatsConfig)

    def built_arch(self) -> str:
        return "clipweather_net" if self.model.arch == "clipweather" else self.model.arch  # the bundle's trained net

    def check(self) -> None:
        super().check()
        if self.model.arch != "clipweather" and (self.loss.w_text > 0 or self.loss.w_srd > 0):
            raise UserError(f"loss.w_text and loss.w_srd need model.arch: clipweather, not '{self.model.arch}'")


class TeacherRecipe(Recipe):
    def __init__(self, cfg: Config):
        self.cfg, m, loss = cfg, cfg.model, cfg.loss
        self.weathers = open_set(cfg.data.train_shards).weathers
        self.pixel = L.PIXEL[loss.pixel]
        helpers, self.text_features = {}, None
        random_init = False
        if m.arch == "clipweather":
            image_model, random_init = clip.create(m.clip.image, m.allow_random_init, "model.clip.image")
            helpers["clip_image"] = Helper(clip.ImagePrior(image_model), "bundled")  # the export runs on images alone
            if loss.w_text > 0:
                self.text_features = clip.text_features(image_model, m.clip.image.name,
                                                        clip.weather_prompts(self.weathers))
            if loss.w_srd > 0:
                rn_model, rn_random = clip.create(m.clip.residual, m.allow_random_init, "model.clip.residual")
                helpers["clip_residual"] = Helper(clip.ResidualFeatures(rn_model))
                random_init = random_init or rn_random
            text_dim = image_model.text_projection.shape[1] if hasattr(image_model, "text_projection") else 512
            net = models.build("clipweather_net", prior_dim=helpers["clip_image"].module.width, text_dim=int(text_dim),
                               **m.arch_kwargs())
        else:
            net = models.build(m.arch, **m.arch_kwargs())
        if loss.w_perceptual > 0:
            helpers["vgg"] = Helper(L.Perceptual(loss.vgg_weights))
        super().__init__(net, helpers)
        self.random_init = random_init

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
        if w.w_keep:
            losses["keep"] = w.w_keep * L.keep_loss(out, x, y)
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
        # With its weathers' text features the teacher classifies weather itself (`weatherkd dream` uses that).
        weathers = self.weathers if self.text_features is not None else None
        bundle = models.build("clipweather", net=model.weatherkd_spec["kwargs"],
                              clip_image=self.cfg.model.clip.image.name, weathers=weathers)
        bundle.load_parts(state, self.bundled_state("clip_image"),
                          self.text_features.float().cpu() if weathers else None)
        return bundle, bundle.state_dict()


    def after_export(self, engine, path) -> None:
        """Feature statistics of the exported model (as users load it) on un-augmented training
        crops, every rank recording its own batches; saved next to the weights."""
        cfg, acc, want = self.cfg, engine.acc, self.cfg.stats
        if want.batches <= 0:
            return
        d = cfg.data
        plain = TrainSpec.of(d, flip=False, cutmix_prob=0.0)
        loader = train_loader(d.train_shards, d.train_split, d.weathers, plain, cfg.seed + 1, acc.process_index,
                              acc.num_processes, want.batches, d.num_workers, prepare=engine.to_device)
        exported = models.load(path).to(acc.device).eval()
        if not feature_stats.select_layers(exported, want.layers):
            log.info("no layer of the exported model matches stats.layers %s: no feature statistics recorded",
                     want.layers)
            return
        batches = loader.epoch(0, 0)
        reduce = (lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu()) if acc.num_processes > 1 else None
        stats = feature_stats.record(exported, batches, engine.weathers, want.layers, reduce)
        if acc.is_main_process:
            feature_stats.save(stats, path, {"layers": feature_stats.layers_in(stats), "weathers": engine.weathers,
                                             "batches": want.batches * acc.num_processes,
                                             "batch_size": d.batch_size, "crop": d.crop,
                                             "shards": str(d.train_shards)})
            log.info("recorded feature statistics of %d layers in %s", len(feature_stats.layers_in(stats)),
                     path / feature_stats.STATS_FILE)
        acc.wait_for_everyone()


RECIPE = TeacherRecipe  # what `weatherkd bench step` builds for this stage


def run(cfg: Config) -> int:
    Engine(cfg, RECIPE, "teacher").fit()
    return 0
