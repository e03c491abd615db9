"""`weatherkd adapter`: D4IR's contrast-based degradation prompt adapter (docs/references.md).

Input: degraded images only (shards whose samples may lack targets), labelled by weather.
A frozen CLIP image tower embeds each image; the head maps the embedding to ``prompt.tokens``
embeddings of width ``prompt.width`` (the SD UNet's ``cross_attention_dim``).

Objective (our design; the paper gives no code): a supervised contrastive loss (SupCon) on the
pooled prompts of two views per image. Views keep the weather and change the content: each is
a random crop at its own place and scale, flipped at random, and with probability
``shuffle_prob`` cut into a grid of tiles that are shuffled. Rain streaks, drops and flakes are
local textures that survive this; the scene layout does not. Same weather attracts, different
weather repels.

Validation is weather retrieval: each eval image's pooled prompt is matched to the nearest
per-weather mean prompt. Those per-weather means, from the final validation, are exported with
the adapter as the prompts `weatherkd synth` uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from weatherkd import models
from weatherkd.config import ModelConfig, StageConfig
from weatherkd.data.shards import open_set
from weatherkd.engine import Engine, Recipe
from weatherkd.models import clip
from weatherkd.models.prompt_adapter import pooled
from weatherkd.precision import Helper, autocast


@dataclass
class AdapterModelConfig(ModelConfig):
    arch: str = "prompt_adapter_head"
    clip: clip.ClipTowerConfig = field(default_factory=lambda: clip.ClipTowerConfig("ViT-B-32"))


@dataclass
class PromptConfig:
    tokens: int = 8
    width: int = 768  # the SD UNet's cross_attention_dim (768 for SD 1.x)
    hidden: int = 512
    temperature: float = 0.1
    shuffle_prob: float = 0.5
    grid: int = 4  # tiles per side when shuffling


@dataclass
class Config(StageConfig):
    out_dir: str = "runs/adapter"
    model: AdapterModelConfig = field(default_factory=AdapterModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)


def content_changing_view(x: torch.Tensor, generator: torch.Generator, shuffle_prob: float, grid: int) -> torch.Tensor:
    """A view of each image with its weather kept and its content moved (see the module doc)."""
    b, _, h, w = x.shape
    views = []
    for i in range(b):
        scale = 0.4 + 0.6 * torch.rand((), generator=generator).item()
        ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
        top = int(torch.randint(0, h - ch + 1, (), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (), generator=generator))
        v = F.interpolate(x[i:i + 1, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                          align_corners=False)
        if torch.rand((), generator=generator) < 0.5:
            v = v.flip(-1)
        if torch.rand((), generator=generator) < shuffle_prob and h % grid == 0 and w % grid == 0:
            th, tw = h // grid, w // grid
            tiles = v.unfold(2, th, th).unfold(3, tw, tw).reshape(1, 3, grid * grid, th, tw)
            tiles = tiles[:, :, torch.randperm(grid * grid, generator=generator)]
            v = tiles.view(1, 3, grid, grid, th, tw).permute(0, 1, 2, 4, 3, 5).reshape(1, 3, h, w)
        views.append(v)
    return torch.cat(views)


def supcon(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over unit vectors ``z`` with class ``labels``."""
    n = z.shape[0]
    logits = z @ z.t() / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    per_anchor = -(log_prob.masked_fill(~positives, 0).sum(1)) / positives.sum(1).clamp_min(1)
    return per_anchor[positives.any(1)].mean()


class AdapterRecipe(Recipe):
    def __init__(self, cfg: Config):
        self.cfg, m, p = cfg, cfg.model, cfg.prompt
        tower, self.random_init = clip.create(m.clip, m.allow_random_init, "model.clip")
        encoder = clip.ImagePrior(tower)
        head = models.build(m.arch, clip_width=encoder.width, tokens=p.tokens, width=p.width, hidden=p.hidden,
                            **m.kwargs)
        # bundled: users load tower, head and prompts as one model
        super().__init__(head, {"clip_image": Helper(encoder, "bundled")})
        self.weathers = open_set(cfg.data.train_shards).weathers
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.weather_prompts = torch.zeros(len(self.weathers), p.tokens, p.width)

    def step(self, model, batch, step):
        x, p = batch["input"], self.cfg.prompt
        with torch.no_grad():
            views = torch.cat([content_changing_view(x.cpu(), self.generator, p.shuffle_prob, p.grid)
                               for _ in range(2)]).to(x.device)
            embedding = self.frozen["clip_image"](views)
        labels = batch["weather"].repeat(2)
        loss = supcon(pooled(model(embedding)), labels, p.temperature)
        return {"loss": loss, "supcon": loss.detach()}

    @torch.no_grad()
    def validate(self, model, loader, accelerator, to_device) -> dict:
        """Weather retrieval by nearest per-weather mean prompt; keeps those means for export."""
        n_w, p = len(self.weathers), self.cfg.prompt
        sums = torch.zeros(n_w, p.tokens, p.width, device=accelerator.device)
        counts = torch.zeros(n_w, device=accelerator.device)
        seen = []
        for batch in loader:
            batch = to_device(batch)
            with autocast(accelerator):  # the frozen tower is in the compute dtype; the scoring below is not
                prompts = model(self.frozen["clip_image"](batch["input"].float())).float()
            for prompt, weather, valid in zip(prompts, batch["weather"], batch["valid"]):
                if valid:
                    sums[weather] += prompt
                    counts[weather] += 1
                    seen.append((pooled(prompt[None])[0], int(weather)))
        sums, counts = accelerator.reduce(sums, "sum"), accelerator.reduce(counts, "sum")
        self.weather_prompts = (sums / counts.clamp_min(1)[:, None, None]).cpu()
        centroids = pooled(self.weather_prompts.to(accelerator.device))
        correct = torch.tensor([float(sum(int((centroids @ z).argmax()) == w for z, w in seen)), float(len(seen))],
                               device=accelerator.device)
        correct = accelerator.reduce(correct, "sum")
        return {"kind": "prompt_retrieval", "accuracy": float(correct[0] / correct[1].clamp_min(1)),
                "n": int(correct[1]), "per_weather_n": dict(zip(self.weathers, counts.int().tolist()))}

    def export_model(self, model, state):
        """The adapter users load: CLIP tower + head + per-weather prompts, one ``prompt_adapter``."""
        bundle = models.build("prompt_adapter", head=model.weatherkd_spec["kwargs"],
                              clip_image=self.cfg.model.clip.name, weathers=self.weathers)
        bundle.load_parts(state, self.bundled_state("clip_image"), self.weather_prompts)
        return bundle, bundle.state_dict()


RECIPE = AdapterRecipe


def run(cfg: Config) -> int:
    Engine(cfg, RECIPE, "adapter").fit()
    return 0
