"""`weatherkd bench synth`: batched img2img against diffusers' stock pipeline."""

from __future__ import annotations

import argparse
import time

import torch

from weatherkd.placement import place
from weatherkd.precision import dtype_named


def run(argv: list[str]) -> dict:
    """Our batched img2img against diffusers' stock StableDiffusionImg2ImgPipeline called one image at a
    time: same model, steps, strength and images, in one run."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from weatherkd import cost
    from weatherkd.models import diffusion

    p = argparse.ArgumentParser(prog="weatherkd bench synth")
    p.add_argument("--sd-path", required=True, help="local diffusers Stable Diffusion folder")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--strength", type=float, default=0.6)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    a = p.parse_intermixed_args(argv)
    device = place().device
    dtype = dtype_named(a.dtype, device)
    sd = diffusion.load(a.sd_path, device, dtype)
    images = torch.rand(a.images, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    prompts = torch.randn(a.images, 8, sd.prompt_width, generator=torch.Generator().manual_seed(1))

    def ours():
        for i in range(0, a.images, a.batch_size):
            gens = [torch.Generator(device).manual_seed(k) for k in range(i, min(i + a.batch_size, a.images))]
            diffusion.img2img(sd, images[i:i + a.batch_size], prompts[i:i + a.batch_size], a.strength, a.steps, gens)

    pipe = StableDiffusionImg2ImgPipeline(vae=sd.vae, text_encoder=None, tokenizer=None, unet=sd.unet,
                                          scheduler=sd.scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def stock():
        for i in range(a.images):
            pipe(image=images[i:i + 1], prompt_embeds=prompts[i:i + 1].to(device, dtype),
                 negative_prompt_embeds=torch.zeros_like(prompts[i:i + 1]).to(device, dtype), strength=a.strength,
                 num_inference_steps=a.steps, guidance_scale=1.0, output_type="pt",
                 generator=torch.Generator(device).manual_seed(i))

    timings = {}
    for name, fn in (("weatherkd_batched", ours), ("diffusers_one_by_one", stock)):
        fn()  # warm-up
        cost.sync(device)
        start = time.perf_counter()
        fn()
        cost.sync(device)
        timings[name] = a.images / (time.perf_counter() - start)
    return {"bench": "synth", "device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(),
            "images": a.images, "batch_size": a.batch_size, "size": a.size, "steps": a.steps,
            "strength": a.strength, "images_per_s": timings,
            "speedup": timings["weatherkd_batched"] / timings["diffusers_one_by_one"]}
