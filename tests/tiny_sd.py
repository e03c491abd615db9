"""A tiny random Stable Diffusion saved in diffusers' folder layout: what a user's real weights look like
on disk, at a size that runs on CPU in seconds (sizes from the environment notes)."""

from pathlib import Path


def save_tiny_sd(path: Path, cross_attention_dim: int = 32) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    scheduler.save_pretrained(path / "scheduler")
    return path


def save_d4ir_parts(root: Path) -> dict:
    """Everything `weatherkd synth` reads, tiny: SD folder, exported adapter and teacher, a clean set."""
    import torch

    from conftest import make_set
    from weatherkd import models

    sd = save_tiny_sd(root / "sd", cross_attention_dim=32)
    torch.manual_seed(0)
    adapter = models.build("prompt_adapter", head={"clip_width": 64, "tokens": 4, "width": 32, "hidden": 32},
                           clip_image="wkd-tiny-vit", weathers=["rain_haze", "raindrop", "snow"])
    adapter.weather_prompts.normal_()
    models.save(adapter, root / "adapter", extra={"random_init": True})
    models.save(models.build("residual_cnn", width=8, depth=3), root / "teacher")
    make_set(root / "clean", {("train", "snow"): 7}, size=40)
    return {"sd": sd, "adapter": root / "adapter", "teacher": root / "teacher", "clean": root / "clean", "root": root}


def save_sd15_layout(path: Path, width: int = 32) -> Path:
    """Stable Diffusion 1.5's folder as diffusers (and the Hub) lay it out: model_index.json, the UNet,
    VAE and PNDM scheduler with SD 1.5's config keys, block types and cross_attention_dim 768, random
    weights in diffusion_pytorch_model.safetensors. Only the channel widths are cut (320 -> ``width``)."""
    import json

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    w = width
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(w, 2 * w, 4 * w, 4 * w),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5)
    vae = AutoencoderKL(
        sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        block_out_channels=(w, 2 * w, 4 * w, 4 * w), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", scaling_factor=0.18215)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"], "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return path
