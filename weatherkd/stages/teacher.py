"""`weatherkd teacher`: train a restoration teacher on paired shards.

Today it trains any registered restorer with a pixel loss; the CLIP-guided
``clipweather`` arch and its losses (SSIM, PSNR, perceptual, text, CLIP-SRD) are
the next issue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from weatherkd import models
from weatherkd.config import ModelConfig, StageConfig, register_stage_config
from weatherkd.engine import Engine, Recipe


@dataclass
class LossConfig:
    pixel: Literal["smooth_l1", "l1", "l2"] = "smooth_l1"


@register_stage_config("teacher")
@dataclass
class Config(StageConfig):
    out_dir: str = "runs/teacher"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="residual_cnn"))
    loss: LossConfig = field(default_factory=LossConfig)


PIXEL_LOSSES = {"smooth_l1": F.smooth_l1_loss, "l1": F.l1_loss, "l2": F.mse_loss}


class TeacherRecipe(Recipe):
    def __init__(self, cfg: Config):
        super().__init__(models.build(cfg.model.arch, **cfg.model.kwargs))
        self.pixel = PIXEL_LOSSES[cfg.loss.pixel]

    def step(self, model, batch, step):
        pred = model(batch["input"])
        pixel = self.pixel(pred, batch["target"])
        return {"loss": pixel, "pixel": pixel}


def run(cfg: Config) -> int:
    Engine(cfg, TeacherRecipe).fit()
    return 0
