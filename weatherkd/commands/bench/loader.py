"""`weatherkd bench loader`: the training loader against a naive folder of PNG pairs."""

from __future__ import annotations

import argparse
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
from weatherkd.errors import UserError


FOLDER_FIELDS = {"input": "input", "target": "gt", "teacher": "teacher"}  # field -> sub-folder


class NaiveFolderPairs(Dataset):
    """The TransWeather/BasicSR way: one PIL open and full decode per image file, per sample."""

    def __init__(self, root: Path, crop: int):
        self.inputs = sorted((root / "input").glob("*.png"))
        self.fields = [f for f, sub in FOLDER_FIELDS.items() if (root / sub).is_dir()]
        self.root, self.crop = root, crop

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        name = self.inputs[i].name
        sample = {f: np.asarray(Image.open(self.root / FOLDER_FIELDS[f] / name).convert("RGB")) for f in self.fields}
        sample = paired_crop_flip(sample, self.crop, rng)
        # uint8, as the shard loader yields (both become float on the device)
        return tuple(torch.from_numpy(sample[f].copy()).permute(2, 0, 1) for f in self.fields)


def _allweather_like(dest: Path, n: int, size: tuple[int, int], encodings: list[str]) -> dict[str, Path]:
    """``n`` samples at AllWeather's size (W×H): a weather-degraded photo, its clean target and a
    teacher-like output (halfway between), as one shard set per encoding and as a folder of PNG files.
    Built untimed, from the builtin photos; the pixels are the same in every copy."""
    from weatherkd.data import weather as weather_models
    from weatherkd.data.photo_set import load_photos
    from weatherkd.data.samples import encode_image, encode_sample, to_uint8
    from weatherkd.data.shards import ShardSetWriter

    photos = load_photos("builtin")
    weathers = list(weather_models.MODELS)
    writers = {e: ShardSetWriter(dest / f"shards-{e}", weathers, shard_size=64) for e in encodings}
    for sub in FOLDER_FIELDS.values():
        (dest / "folder" / sub).mkdir(parents=True)
    for k in range(n):
        rng = np.random.default_rng([7, k])
        name, photo = photos[k % len(photos)]
        clean = np.asarray(Image.fromarray(to_uint8(photo)).resize(size, Image.BICUBIC))
        w = weathers[k % len(weathers)]
        degraded, _ = weather_models.degrade(clean.astype(np.float32) / 255, w, rng)
        images = {"input": to_uint8(degraded), "target": clean}
        images["teacher"] = ((images["input"].astype(np.uint16) + clean) // 2).astype(np.uint8)
        for e, writer in writers.items():
            writer.add("train", w, encode_sample(f"aw_{k:06d}", images["input"], weathers.index(w), {"origin": name},
                                                 target=images["target"], teacher=images["teacher"], encoding=e))
        for f, sub in FOLDER_FIELDS.items():
            (dest / "folder" / sub / f"{k:06d}.png").write_bytes(encode_image(images[f], "png"))
    for writer in writers.values():
        writer.close()
    return {e: dest / f"shards-{e}" for e in encodings}


def _export_folder(shards_dir: str, split: str, dest: Path) -> None:
    """A shard set's images as PNG files, one folder per field (untimed setup for the naive loader)."""
    from weatherkd.data.samples import decode_member, encode_image, image_member

    shard_set = open_set(shards_dir, split)
    for s in shard_set.shards(split):
        for raw in iter_tar(shard_set.dir / s["file"]):
            for f, sub in FOLDER_FIELDS.items():
                name = image_member(raw, f)
                if name is None:
                    continue
                (dest / sub).mkdir(parents=True, exist_ok=True)
                data = raw[name] if name.endswith(".png") else encode_image(decode_member(name, raw[name]), "png")
                (dest / sub / f"{raw['__key__']}.png").write_bytes(data)


def _time_batches(iterator, batches: int, warmup: int) -> float:
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return time.perf_counter() - start


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="weatherkd bench loader")
    p.add_argument("--shards", default=None, help="a shard set to read (default: build AllWeather-size samples, "
                                                 "one set per --encodings, in a temporary folder)")
    p.add_argument("--split", default="train")
    p.add_argument("--size", default="640x480", help="W×H of the built samples (AllWeather's are about 640x480)")
    p.add_argument("--samples", type=int, default=48, help="built samples")
    p.add_argument("--encodings", nargs="+", default=["png", "qoi"], help="encodings of the built sets")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_intermixed_args(argv)
    from weatherkd.data.samples import ENCODINGS

    if bad := [e for e in a.encodings if e not in ENCODINGS]:
        raise UserError(f"bench loader: unknown encoding {bad[0]}; known: {', '.join(ENCODINGS)}")
    try:
        size = tuple(int(v) for v in a.size.lower().split("x"))
        assert len(size) == 2 and min(size) > 0
    except (ValueError, AssertionError):
        raise UserError(f"bench loader: --size must be W×H, e.g. 640x480 (got '{a.size}')") from None
    spec = TrainSpec(crop=a.crop, batch_size=a.batch_size, shuffle_buffer=16)
    total, samples = a.batches + a.warmup, a.batches * a.batch_size
    cores = max(1, a.workers)  # the workers decode; the main process only receives batches

    def rate(secs: float) -> dict:
        return {"samples_per_s": samples / secs, "samples_per_s_per_core": samples / secs / cores}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.shards:
            sets = {open_set(a.shards, a.split).encoding: Path(a.shards)}
            _export_folder(a.shards, a.split, tmp / "folder")
        else:
            sets = _allweather_like(tmp, a.samples, size, a.encodings)
        result = {"bench": "loader", "source": a.shards or f"built: {a.samples} samples of {size[0]}x{size[1]} "
                  "(input, target, teacher) from the builtin photos", "workers": a.workers, "cores": cores,
                  "batch_size": a.batch_size, "crop": a.crop, "samples": samples}
        naive = DataLoader(NaiveFolderPairs(tmp / "folder", a.crop), batch_size=a.batch_size, shuffle=True,
                           num_workers=a.workers, drop_last=True, persistent_workers=a.workers > 0)
        naive_s = _time_batches((b for _ in range(10**6) for b in naive), a.batches, a.warmup)
        result["naive_folder"] = {**rate(naive_s), "bytes_per_sample": _bytes_per_sample(tmp / "folder")}
        png_bytes = None
        for encoding, path in sets.items():
            loader = train_loader(path, a.split, None, spec, seed=0, rank=0, world_size=1,
                                  batches_per_epoch=total, num_workers=a.workers)
            secs = _time_batches(iter(loader.epoch(0)), a.batches, a.warmup)
            shard_set = open_set(path, a.split)
            per_sample = sum(s["bytes"] for s in shard_set.shards(a.split)) / shard_set.count(a.split)
            png_bytes = per_sample if encoding == "png" else png_bytes
            result[f"shards_{encoding}"] = {**rate(secs), "bytes_per_sample": per_sample,
                                            "speedup_vs_naive": naive_s / secs}
        for encoding in sets:
            if png_bytes:
                result[f"shards_{encoding}"]["bytes_vs_png"] = result[f"shards_{encoding}"]["bytes_per_sample"] / png_bytes
    return result


def _bytes_per_sample(folder: Path) -> float:
    files = [f for sub in FOLDER_FIELDS.values() if (folder / sub).is_dir() for f in (folder / sub).iterdir()]
    return sum(f.stat().st_size for f in files) / max(1, len(list((folder / "input").iterdir())))
