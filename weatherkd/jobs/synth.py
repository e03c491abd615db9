"""`weatherkd synth`: D4IR's sharded synthesis job. Clean images + the adapter's weather prompts
-> Stable Diffusion img2img -> distillation tars (``input.png``, no target, optional cached
``teacher.png``, ``prov.json``).

Sample ``k`` is clean image ``k // W`` under weather ``k % W``. Sharding, slices (SLURM array
tasks or ranks), atomic writes, resume and the manifest: the job runner, ``weatherkd.jobs.runner``.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from weatherkd import models
from weatherkd.precision import dtype_named
from weatherkd.jobs.runner import ShardedJob, SliceConfig, sample_seed, teacher_hash
from weatherkd.data.samples import decode_member, encode_sample, to_uint8
from weatherkd.data.shards import open_set
from weatherkd.config import RunConfig
from weatherkd.errors import UserError
from weatherkd.io import sha256_file
from weatherkd.models import diffusion


@dataclass
class Config(RunConfig):
    out_dir: str = "shards/synth"
    sd_path: str = ""  # local diffusers Stable Diffusion folder (vae/, unet/, scheduler/)
    adapter: str = ""  # exported `weatherkd adapter` model: its per-weather prompts condition SD
    clean: str = ""  # clean images: a shard set (its targets, else its inputs) or a folder of images
    clean_split: str = "train"
    max_images: int = 0  # 0: all
    weathers: list[str] = field(default_factory=list)  # default: every weather the adapter knows
    size: int = 512  # images are resized and centre-cropped to size × size (a multiple of 8)
    strength: float = 0.6
    steps: int = 30
    guidance_scale: float = 1.0
    batch_size: int = 4
    shard_size: int = 64
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    teacher: str = ""  # exported teacher: cache its output as teacher.png
    slice: SliceConfig = field(default_factory=SliceConfig)

    def check(self) -> None:
        diffusion.check_schedule(self.strength, self.steps)
        if self.size % 8:
            raise UserError(f"size must be a multiple of 8 (the VAE downsamples by 8), got {self.size}")


class CleanImages:
    """Random access to clean images from a shard set or a folder, in a fixed order."""

    def __init__(self, source: str, split: str, max_images: int):
        path = Path(source)
        if not source or not path.exists():
            raise UserError(f"clean: no such shard set or folder: '{source}'")
        # items: (file, key, byte range of the image inside a tar, or None for a plain image file)
        if (path / "manifest.json").is_file():
            shard_set = open_set(path, split)
            field = "target" if shard_set.has_target(split) else "input"
            suffix = self.suffix = f".{field}.{shard_set.encoding}"
            self.items = []
            for s in shard_set.shards(split):
                with tarfile.open(shard_set.dir / s["file"]) as tar:  # headers only: offsets for direct reads
                    self.items += [(shard_set.dir / s["file"], m.name[:-len(suffix)], (m.offset_data, m.size))
                                   for m in tar.getmembers() if m.name.endswith(suffix)]
        else:
            files = sorted(f for f in path.rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
            self.items = [(f, f.stem, None) for f in files]
        if max_images:
            self.items = self.items[:max_images]
        if not self.items:
            raise UserError(f"clean: {source} holds no images")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int, size: int) -> np.ndarray:
        where, _, span = self.items[i]
        if span is None:
            with Image.open(where) as im:
                img = np.asarray(im.convert("RGB"))
        else:
            with open(where, "rb") as f:  # one seek, not a scan of the tar up to this member
                f.seek(span[0])
                img = decode_member(self.suffix, f.read(span[1]))
        return _square(img, size)


def _square(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = size / min(h, w)
    im = Image.fromarray(img).resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


class Synthesiser(ShardedJob):
    stage = "synth"

    def __init__(self, cfg: Config):
        super().__init__(cfg.out_dir, cfg.shard_size, cfg.batch_size, cfg.slice,
                         {k: v for k, v in vars(cfg).items() if k != "slice"})
        self.cfg = cfg
        if not cfg.adapter:
            raise UserError("adapter is not set: give an exported `weatherkd adapter` model directory")
        device = self.device
        dtype = dtype_named(cfg.dtype, device)
        self.sd = diffusion.load(cfg.sd_path, device, dtype, cfg.attention)
        adapter = models.load(cfg.adapter)
        self.weathers = cfg.weathers or adapter.weathers
        self.prompts = torch.stack([adapter.prompts_for(w) for w in self.weathers])
        if self.prompts.shape[-1] != self.sd.prompt_width:
            raise UserError(f"the adapter's prompts are {self.prompts.shape[-1]} wide but the UNet's "
                            f"cross_attention_dim is {self.sd.prompt_width}; train the adapter with "
                            f"prompt.width={self.sd.prompt_width}")
        self.teacher = models.load(cfg.teacher).to(device).eval() if cfg.teacher else None
        if cfg.teacher:  # its teacher.png are this teacher's outputs
            self.teacher_sha256 = teacher_hash(cfg.teacher)
        self.clean = CleanImages(cfg.clean, cfg.clean_split, cfg.max_images)
        self.total = len(self.clean) * len(self.weathers)
        self.prov = {"sd": diffusion.file_hashes(cfg.sd_path), "adapter": sha256_file(Path(cfg.adapter) /
                     models.registry.WEIGHTS)[:16], "strength": cfg.strength, "steps": cfg.steps,
                     "guidance_scale": cfg.guidance_scale, "size": cfg.size, "dtype": str(dtype)}

    @torch.no_grad()
    def generate(self, ks: list[int]) -> list[dict]:
        cfg, n_w = self.cfg, len(self.weathers)
        clean = np.stack([self.clean.load(k // n_w, cfg.size) for k in ks])
        x = torch.from_numpy(clean).permute(0, 3, 1, 2).float() / 255
        gens = [torch.Generator(self.sd.device).manual_seed(sample_seed(cfg.seed, k)) for k in ks]
        prompts = self.prompts[[k % n_w for k in ks]]
        out = diffusion.img2img(self.sd, x, prompts, cfg.strength, cfg.steps, gens, cfg.guidance_scale)
        teacher = self.teacher(out.to(next(self.teacher.parameters()).device)).clamp(0, 1) if self.teacher else None
        samples = []
        for i, k in enumerate(ks):
            img = to_uint8(out[i])
            t_img = to_uint8(teacher[i]) if teacher is not None else None
            w = k % n_w
            prov = {**self.prov, "seed": sample_seed(cfg.seed, k), "weather": self.weathers[w],
                    "prompt_id": f"adapter:{self.prov['adapter']}:{self.weathers[w]}",
                    "clean": self.clean.items[k // n_w][1]}
            samples.append(encode_sample(f"synth_{k:08d}", img, w, {"source": "d4ir"}, teacher=t_img, prov=prov))
        return samples


def run(cfg: Config) -> int:
    Synthesiser(cfg).run()
    return 0
