"""`weatherkd synth`: D4IR's sharded synthesis job. Clean images + the adapter's weather prompts
-> Stable Diffusion img2img -> distillation tars (``input.png``, no target, optional cached
``teacher.png``, ``prov.json``).

Sample ``k`` is clean image ``k // W`` under weather ``k % W``; output shard ``j`` holds samples
``[j·S, (j+1)·S)``. Task ``t`` of ``T`` writes the shards with ``j % T == t``, where (t, T) comes
from ``slice.index/count`` (the SLURM array template sets them), else SLURM_ARRAY_TASK_*, else
the accelerate rank and world size. Each shard is written to a temp file and renamed, then its
sidecar ``<shard>.json``; a shard with its sidecar is skipped on rerun. Seeds depend only on
(seed, k), so a killed job resumes to a byte-identical set. Whoever finds every sidecar present
writes ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from weatherkd import models
from weatherkd.data.samples import decode_image, encode_sample
from weatherkd.data.shards import build_manifest, open_set, shard_name
from weatherkd.errors import UserError
from weatherkd.io import atomic_write_json, sha256_file
from weatherkd.logs import get_logger, progress
from weatherkd.models import diffusion

log = get_logger(__name__)
SPLIT, GROUP = "train", "mixed"


@dataclass
class SliceConfig:
    index: int = 0
    count: int = 0  # 0: from SLURM_ARRAY_TASK_* or the accelerate rank/world size


@dataclass
class Config:
    out_dir: str = "shards/synth"
    seed: int = 0
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


class CleanImages:
    """Random access to clean images from a shard set or a folder, in a fixed order."""

    def __init__(self, source: str, split: str, max_images: int):
        path = Path(source)
        if not source or not path.exists():
            raise UserError(f"clean: no such shard set or folder: '{source}'")
        # items: (file, key, byte range of the image inside a tar, or None for a plain image file)
        if (path / "manifest.json").is_file():
            shard_set = open_set(path, split)
            suffix = ".target.png" if shard_set.has_target(split) else ".input.png"
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
                img = decode_image(f.read(span[1]))
        return _square(img, size)


def _square(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = size / min(h, w)
    im = Image.fromarray(img).resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def task_slice(cfg: Config) -> tuple[int, int]:
    if cfg.slice.count > 0:
        index, count = cfg.slice.index, cfg.slice.count
    elif "SLURM_ARRAY_TASK_ID" in os.environ:
        lo = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - lo
        count = int(os.environ.get("SLURM_ARRAY_TASK_MAX", index)) - lo + 1
    else:
        index, count = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= index < count:
        raise UserError(f"slice.index {index} is outside 0..{count - 1}")
    return index, count


def sample_seed(seed: int, k: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "little") >> 1


class Synthesiser:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        diffusion.check_schedule(cfg.strength, cfg.steps)
        if cfg.size % 8:
            raise UserError(f"size must be a multiple of 8 (the VAE downsamples by 8), got {cfg.size}")
        if not cfg.adapter:
            raise UserError("adapter is not set: give an exported `weatherkd adapter` model directory")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                 "auto": torch.float16 if device == "cuda" else torch.float32}[cfg.dtype]
        self.sd = diffusion.load(cfg.sd_path, device, dtype, cfg.attention)
        adapter = models.load(cfg.adapter)
        self.weathers = cfg.weathers or adapter.weathers
        self.prompts = torch.stack([adapter.prompts_for(w) for w in self.weathers])
        if self.prompts.shape[-1] != self.sd.prompt_width:
            raise UserError(f"the adapter's prompts are {self.prompts.shape[-1]} wide but the UNet's "
                            f"cross_attention_dim is {self.sd.prompt_width}; train the adapter with "
                            f"prompt.width={self.sd.prompt_width}")
        self.teacher = models.load(cfg.teacher).to(device).eval() if cfg.teacher else None
        self.clean = CleanImages(cfg.clean, cfg.clean_split, cfg.max_images)
        self.total = len(self.clean) * len(self.weathers)
        self.n_shards = -(-self.total // cfg.shard_size)
        self.out = Path(cfg.out_dir)
        self.prov = {"sd": diffusion.file_hashes(cfg.sd_path), "adapter": sha256_file(Path(cfg.adapter) /
                     models.registry.WEIGHTS)[:16], "strength": cfg.strength, "steps": cfg.steps,
                     "guidance_scale": cfg.guidance_scale, "size": cfg.size, "dtype": str(dtype)}

    def sidecar(self, j: int) -> Path:
        return self.out / f"{shard_name(SPLIT, GROUP, j)}.json"

    def write_shard(self, j: int) -> None:
        cfg, out = self.cfg, self.out
        final = out / shard_name(SPLIT, GROUP, j)
        tmp = out / f".{final.name}.tmp"
        ks = range(j * cfg.shard_size, min((j + 1) * cfg.shard_size, self.total))
        writer = wds.TarWriter(str(tmp), mtime=0, format=tarfile.USTAR_FORMAT)
        for start in range(ks.start, ks.stop, cfg.batch_size):
            batch = list(range(start, min(start + cfg.batch_size, ks.stop)))
            for sample in self.generate(batch):
                writer.write(sample)
        writer.close()
        os.replace(tmp, final)
        atomic_write_json(self.sidecar(j), {"file": final.name, "split": SPLIT, "group": GROUP, "count": len(ks),
                                            "sha256": sha256_file(final), "bytes": final.stat().st_size})

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
            img = (out[i].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            t_img = (teacher[i].permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8) \
                if teacher is not None else None
            w = k % n_w
            prov = {**self.prov, "seed": sample_seed(cfg.seed, k), "weather": self.weathers[w],
                    "prompt_id": f"adapter:{self.prov['adapter']}:{self.weathers[w]}",
                    "clean": self.clean.items[k // n_w][1]}
            samples.append(encode_sample(f"synth_{k:08d}", img, w, {"source": "d4ir"}, teacher=t_img, prov=prov))
        return samples

    def run(self) -> dict | None:
        index, count = task_slice(self.cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        mine = [j for j in range(self.n_shards) if j % count == index]
        todo = [j for j in mine if not (self.sidecar(j).is_file() and (self.out / shard_name(SPLIT, GROUP, j)).is_file())]
        log.info("synth task %d/%d: %d of its %d shards to write (%d samples in all, %d shards)", index, count,
                 len(todo), len(mine), self.total, self.n_shards)
        for j in progress(todo, desc=f"synth {index}/{count}", unit="shard"):
            self.write_shard(j)
        return self.merge()

    def merge(self) -> dict | None:
        """Write the manifest once every shard's sidecar exists (any task may be the last)."""
        if not all(self.sidecar(j).is_file() for j in range(self.n_shards)):
            return None
        shards = [json.loads(self.sidecar(j).read_text()) for j in range(self.n_shards)]
        manifest = build_manifest(shards, self.weathers, {SPLIT: False},
                                  {"stage": "synth", "config": {k: v for k, v in vars(self.cfg).items()
                                                                if k != "slice"}})
        manifest.pop("created", None)  # identical whichever task merges, and on every rerun
        manifest["created_by"].pop("argv", None)
        atomic_write_json(self.out / "manifest.json", manifest)
        log.info("synth: all %d shards present, wrote %s", self.n_shards, self.out / "manifest.json")
        return manifest


def run(cfg: Config) -> int:
    Synthesiser(cfg).run()
    return 0
