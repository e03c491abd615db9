"""Paired augmentation: one crop/flip for every image of a sample, and CutMix across weathers.

Crops work on H×W×C arrays, CutMix on batched C×H×W tensors; a sample's image fields (input, target,
teacher) always get the same geometry, or the supervision would be misaligned.
"""

from __future__ import annotations

import numpy as np
import torch

from weatherkd.data.samples import IMAGE_FIELDS


def paired_crop_flip(sample: dict, size: int, rng: np.random.Generator, flip: bool = True) -> dict:
    """Crop and flip every image field of ``sample`` (H×W×C arrays) identically.

    Runs on the decoded uint8 arrays, before the float conversion, so only the
    crop is ever converted.
    """
    fields = [f for f in IMAGE_FIELDS if f in sample]
    h, w = sample["input"].shape[:2]
    if h < size or w < size:  # small images: reflect-pad up to the crop, never resample
        pad = ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0))
        for f in fields:
            sample[f] = np.pad(sample[f], pad, mode="reflect" if min(h, w) > 1 else "edge")
        h, w = sample["input"].shape[:2]
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    hflip = flip and rng.random() < 0.5
    vflip = flip and rng.random() < 0.5
    for f in fields:
        img = sample[f][y:y + size, x:x + size]
        if hflip:
            img = img[:, ::-1]
        if vflip:
            img = img[::-1]
        sample[f] = img
    return sample


def cutmix_weathers(batch: dict, rng: np.random.Generator, prob: float, max_frac: float) -> dict:
    """Paste a box from a sample of a *different* weather into each chosen sample (Tan et al. 2024 §III-D).

    ``weather_soft`` becomes the area-weighted mixture of the two one-hot labels,
    which is what the teacher's text-classification loss trains against.
    """
    if prob <= 0:
        return batch
    weather = batch["weather"]
    n, (h, w) = len(weather), batch["input"].shape[-2:]
    fields = [f for f in IMAGE_FIELDS if f in batch]
    originals = {f: batch[f].clone() for f in fields}
    soft = batch["weather_soft"]
    for i in range(n):
        others = np.nonzero((weather != weather[i]).numpy())[0]
        if len(others) == 0 or rng.random() >= prob:
            continue
        j = int(rng.choice(others))
        frac = float(rng.uniform(0.1, max_frac))
        bh, bw = max(1, round(h * frac**0.5)), max(1, round(w * frac**0.5))
        y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        for f in fields:
            batch[f][i, :, y:y + bh, x:x + bw] = originals[f][j, :, y:y + bh, x:x + bw]
        area = bh * bw / (h * w)
        soft[i] = (1 - area) * soft[i] + area * torch.nn.functional.one_hot(weather[j], soft.shape[1]).float()
    return batch
