"""Stable Diffusion img2img under prompt embeddings, batched: D4IR's content-driven synthesis.

Loads the VAE, UNet and scheduler of a local diffusers folder (``vae/``, ``unet/``,
``scheduler/``; no text encoder: the prompts are embeddings from the prompt adapter). Knows
nothing about shards or launching.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from weatherkd.errors import UserError
from weatherkd.io import sha256_file

PARTS = ("vae", "unet", "scheduler")


@dataclass
class StableDiffusion:
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
    path: Path

    @property
    def prompt_width(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


def load(path, device="cpu", dtype=torch.float32, attention: str = "auto") -> StableDiffusion:
    """From a local diffusers folder only; ``attention``: auto | sdpa | xformers."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    path = Path(path)
    missing = [p for p in PARTS if not (path / p).is_dir()]
    if not path.is_dir() or missing:
        raise UserError(f"sd_path: {path} is not a local diffusers Stable Diffusion folder "
                        f"(missing {', '.join(missing) or 'the folder'}); nothing is downloaded")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True, torch_dtype=dtype)
    # DDIM with eta = 0: deterministic given the starting noise, so a rerun rewrites identical shards.
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    vae.to(device).eval().requires_grad_(False)
    unet.to(device).eval().requires_grad_(False)
    if attention == "xformers" or (attention == "auto" and torch.device(device).type == "cuda" and _has_xformers()):
        unet.enable_xformers_memory_efficient_attention()
    # Otherwise diffusers' default processor already calls torch's scaled_dot_product_attention.
    return StableDiffusion(vae, unet, scheduler, path)


def _has_xformers() -> bool:
    try:
        import xformers  # noqa: F401
    except ImportError:
        return False
    return True


def file_hashes(path) -> dict[str, str]:
    """sha256 (first 16 hex) of every weight and config file under vae/, unet/, scheduler/."""
    out = {}
    for part in PARTS:
        for f in sorted((Path(path) / part).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(path))] = sha256_file(f)[:16]
    return out


def check_schedule(strength: float, steps: int) -> int:
    """Denoising steps that img2img will run; refuses settings that would run none."""
    if not 0 < strength <= 1:
        raise UserError(f"strength must be in (0, 1], got {strength}")
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    run = min(int(steps * strength), steps)
    if run == 0:
        raise UserError(f"strength {strength} × steps {steps} runs no denoising step "
                        f"(int(steps × strength) = 0); raise steps to at least {int(1 / strength) + 1}")
    return run


@torch.no_grad()
def img2img(sd: StableDiffusion, images: torch.Tensor, prompt_embeds: torch.Tensor, strength: float, steps: int,
            generators: list[torch.Generator], guidance_scale: float = 1.0,
            negative_prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> images that keep their content and take on the prompts.

    Encode to latents, noise them to ``strength``, denoise for the remaining steps under
    ``prompt_embeds`` (B, T, D). With ``guidance_scale > 1``, classifier-free guidance against
    ``negative_prompt_embeds`` (default: zeros, i.e. no prompt). One generator per image.
    """
    run = check_schedule(strength, steps)
    device, dtype = sd.device, sd.dtype
    x = images.to(device, dtype) * 2 - 1
    from diffusers.utils.torch_utils import randn_tensor

    posterior = sd.vae.encode(x).latent_dist
    latents = posterior.sample(generator=generators) * sd.vae.config.scaling_factor
    sd.scheduler.set_timesteps(steps, device=device)
    timesteps = sd.scheduler.timesteps[steps - run:]
    noise = randn_tensor(latents.shape, generator=generators, device=device, dtype=dtype)
    latents = sd.scheduler.add_noise(latents, noise, timesteps[:1].repeat(latents.shape[0]))

    cond = prompt_embeds.to(device, dtype)
    guided = guidance_scale > 1
    if guided:
        uncond = torch.zeros_like(cond) if negative_prompt_embeds is None else negative_prompt_embeds.to(device, dtype)
        cond = torch.cat([uncond, cond])
    for t in timesteps:
        model_in = torch.cat([latents] * 2) if guided else latents
        eps = sd.unet(sd.scheduler.scale_model_input(model_in, t), t, encoder_hidden_states=cond).sample
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = sd.scheduler.step(eps, t, latents).prev_sample
    out = sd.vae.decode(latents / sd.vae.config.scaling_factor).sample
    return ((out.float() + 1) / 2).clamp(0, 1)
