"""D4IR's degradation prompt adapter (docs/references.md): a CLIP image embedding of a degraded image ->
a sequence of prompt embeddings as wide as the Stable Diffusion UNet's text conditioning.

``AdapterHead`` is the trained part. ``PromptAdapter`` is what gets exported: the frozen CLIP image
tower, the head, and the per-weather prompts (the mean prompt over each weather's images), so
`weatherkd synth` needs nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weatherkd.models.registry import register


@register("prompt_adapter_head")
class AdapterHead(nn.Module):
    def __init__(self, clip_width: int, tokens: int = 8, width: int = 768, hidden: int = 512):
        super().__init__()
        self.tokens, self.width = tokens, width
        self.net = nn.Sequential(nn.LayerNorm(clip_width), nn.Linear(clip_width, hidden), nn.GELU(),
                                 nn.Linear(hidden, tokens * width))
        # Prompts live where SD's text embeddings do: per-token LayerNorm, like CLIP's final norm.
        self.norm = nn.LayerNorm(width)

    def forward(self, clip_embedding: torch.Tensor) -> torch.Tensor:
        """(B, clip_width) -> (B, tokens, width)."""
        return self.norm(self.net(clip_embedding).view(-1, self.tokens, self.width))


def pooled(prompts: torch.Tensor) -> torch.Tensor:
    """One unit vector per prompt sequence: what the contrastive loss and retrieval compare."""
    return F.normalize(prompts.float().mean(1), dim=-1)


@register("prompt_adapter")
class PromptAdapter(nn.Module):
    """CLIP image tower + head, with the per-weather prompts as a buffer."""

    def __init__(self, head: dict, clip_image: str, weathers: list[str]):
        super().__init__()
        from weatherkd.models.clip import ImagePrior, build_random

        self.encoder = ImagePrior(build_random(clip_image))  # weights come from model.safetensors
        self.encoder.requires_grad_(False)
        self.head = AdapterHead(**head)
        self.weathers = list(weathers)
        self.register_buffer("weather_prompts", torch.zeros(len(weathers), self.head.tokens, self.head.width))

    def load_parts(self, head_state: dict, encoder_state: dict, weather_prompts: torch.Tensor) -> None:
        """The trained head, its CLIP tower and the per-weather prompts; strict."""
        self.head.load_state_dict(head_state)
        self.encoder.load_state_dict(encoder_state)
        self.weather_prompts.copy_(weather_prompts)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Degraded images (B, 3, H, W) in [0, 1] -> prompt embeddings (B, tokens, width)."""
        return self.head(self.encoder(x))

    def prompts_for(self, weather: str) -> torch.Tensor:
        if weather not in self.weathers:
            raise KeyError(f"the adapter knows weathers {self.weathers}, not '{weather}'")
        return self.weather_prompts[self.weathers.index(weather)]
