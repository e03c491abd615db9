"""`weatherkd vq`: train the small VQ autoencoder DCKD reads features and code distributions from.

It learns clean images only (the shards' targets), so its features describe clean content.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from weatherkd import models
from weatherkd.config import ModelConfig, StageConfig
from weatherkd.engine import Engine, Recipe


@dataclass
class Config(StageConfig):
    out_dir: str = "runs/vq"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="vq"))


class VQRecipe(Recipe):
    def __init__(self, cfg: Config):
        super().__init__(models.build(cfg.model.arch, **cfg.model.kwargs))

    def step(self, model, batch, step):
        clean = batch["target"]
        recon, vq_loss = model(clean, return_loss=True)
        l1 = F.l1_loss(recon, clean)
        return {"loss": l1 + vq_loss, "recon": l1, "vq": vq_loss}

    def predict(self, model, batch):
        return model(batch["target"])  # validation scores the reconstruction of clean images


RECIPE = VQRecipe  # what `weatherkd bench step` builds for this stage


def run(cfg: Config) -> int:
    Engine(cfg, RECIPE, "vq").fit()
    return 0
