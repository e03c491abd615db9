"""`weatherkd bench <what>`: benchmarks that print one JSON object on stdout.

Figures are compared within one run (ratios), because the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from weatherkd.data.augment import paired_crop_flip
from weatherkd.data.check import iter_tar
from weatherkd.data.shards import open_set
from weatherkd.data.stream import TrainSpec, train_loader


class NaiveFolderPairs(Dataset):
    """The TransWeather/BasicSR way: one PIL open per input and per target file, per sample."""

    def __init__(self, root: Path, crop: int):
        self.inputs = sorted((root / "input").glob("*.png"))
        self.root, self.crop = root, crop

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        pair = (("input", self.inputs[i]), ("target", self.root / "gt" / self.inputs[i].name))
        sample = {field: np.asarray(Image.open(path).convert("RGB")) for field, path in pair}
        sample = paired_crop_flip(sample, self.crop, rng)
        return tuple(torch.from_numpy(sample[f].copy()).permute(2, 0, 1).float().div_(255.0) for f in ("input", "target"))


def _export_folder(shards_dir: str, split: str, dest: Path) -> tuple[int, int]:
    """Write the split's pairs as PNG files (untimed setup); returns (samples, decoded bytes per sample)."""
    (dest / "input").mkdir(parents=True)
    (dest / "gt").mkdir()
    shard_set = open_set(shards_dir, split)
    n, nbytes = 0, 0
    for s in shard_set.shards(split):
        for raw in iter_tar(shard_set.dir / s["file"]):
            (dest / "input" / f"{raw['__key__']}.png").write_bytes(raw["input.png"])
            (dest / "gt" / f"{raw['__key__']}.png").write_bytes(raw["target.png"])
            if n == 0:
                with Image.open(dest / "input" / f"{raw['__key__']}.png") as im:
                    nbytes = 2 * im.width * im.height * 3
            n += 1
    return n, nbytes


def _time_batches(iterator, batches: int, warmup: int) -> float:
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return time.perf_counter() - start


def bench_loader(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="weatherkd bench loader")
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args(argv)
    spec = TrainSpec(crop=a.crop, batch_size=a.batch_size, shuffle_buffer=64)
    total = a.batches + a.warmup
    loader = train_loader(a.shards, a.split, None, spec, seed=0, rank=0, world_size=1,
                          batches_per_epoch=total, num_workers=a.workers)
    shards_s = _time_batches(iter(loader.epoch(0)), a.batches, a.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        n, sample_bytes = _export_folder(a.shards, a.split, Path(tmp))
        naive = DataLoader(NaiveFolderPairs(Path(tmp), a.crop), batch_size=a.batch_size, shuffle=True,
                           num_workers=a.workers, drop_last=True, persistent_workers=a.workers > 0)
        naive_iter = (b for _ in range(10**6) for b in naive)
        naive_s = _time_batches(naive_iter, a.batches, a.warmup)
    samples = a.batches * a.batch_size
    result = {"bench": "loader", "workers": a.workers, "batch_size": a.batch_size, "crop": a.crop,
              "samples": samples, "files_in_folder": 2 * n}
    for name, secs in (("shards", shards_s), ("naive_folder", naive_s)):
        result[name] = {"samples_per_s": samples / secs, "decoded_MB_per_s": samples * sample_bytes / secs / 1e6}
    result["speedup"] = naive_s / shards_s
    return result


def bench_kd_overhead(argv: list[str]) -> dict:
    """Step time of scratch vs kd vs dckd on the same student, batch and machine, in one run."""
    from weatherkd import config as cfgmod
    from weatherkd.stages.distill import Config, DistillRecipe

    p = argparse.ArgumentParser(prog="weatherkd bench kd-overhead")
    p.add_argument("--config", default="configs/distill/demo-dckd.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    base = cfgmod.load(Config, a.config, a.overrides)
    spec = TrainSpec(crop=base.data.crop, batch_size=base.data.batch_size, shuffle_buffer=16)
    loader = train_loader(base.data.train_shards, base.data.train_split, None, spec, 0, 0, 1, 1, 0)
    batch = next(iter(loader.epoch(0)))
    result = {"bench": "kd-overhead", "student": base.model.arch, "size": base.model.size,
              "batch": list(batch["input"].shape), "seconds_per_step": {}}
    for objective in ("scratch", "kd", "dckd"):
        torch.manual_seed(0)
        recipe = DistillRecipe(cfgmod.load(Config, a.config, [*a.overrides, f"objective={objective}"]))
        for module in recipe.frozen.values():
            module.requires_grad_(False).eval()
        optimizer = torch.optim.AdamW(recipe.model.parameters(), lr=1e-4)

        def one_step():
            losses = recipe.step(recipe.model, batch, 0)
            losses["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(a.warmup):
            one_step()
        start = time.perf_counter()
        for _ in range(a.steps):
            one_step()
        result["seconds_per_step"][objective] = (time.perf_counter() - start) / a.steps
    t = result["seconds_per_step"]
    result["dckd_over_kd"] = t["dckd"] / t["kd"]
    result["kd_over_scratch"] = t["kd"] / t["scratch"]
    return result


BENCHES = {"loader": bench_loader, "kd-overhead": bench_kd_overhead}


def run(what: str, argv: list[str]) -> int:
    if what not in BENCHES:
        from weatherkd.cli import NotBuilt

        raise NotBuilt(f"weatherkd bench {what}: not built yet (available: {', '.join(BENCHES)})")
    print(json.dumps(BENCHES[what](argv), indent=2))
    return 0
