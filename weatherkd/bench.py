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


BENCHES = {"loader": bench_loader}


def run(what: str, argv: list[str]) -> int:
    if what not in BENCHES:
        from weatherkd.cli import NotBuilt

        raise NotBuilt(f"weatherkd bench {what}: not built yet (available: {', '.join(BENCHES)})")
    print(json.dumps(BENCHES[what](argv), indent=2))
    return 0
