"""Sharded validation: every rank evaluates its slice, rows are gathered and de-duplicated by key."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from accelerate.utils import gather_object

from weatherkd.metrics import psnr_batch, quantize, ssim_batch


def _rows(batch: dict, pred: torch.Tensor, weathers: list[str], protocol: str) -> list[dict]:
    valid = batch["valid"].tolist()
    if "target" not in batch or not any(valid):
        return []
    target, inp = batch["target"].float(), batch["input"].float()
    p_psnr, p_ssim = psnr_batch(pred, target, protocol), ssim_batch(pred, target, protocol)
    i_psnr, i_ssim = psnr_batch(inp, target, protocol), ssim_batch(inp, target, protocol)
    return [
        {"key": k, "weather": weathers[int(w)], "psnr": float(a), "ssim": float(b),
         "id_psnr": float(c), "id_ssim": float(d)}
        for k, w, ok, a, b, c, d in zip(batch["key"], batch["weather"], valid, p_psnr, p_ssim, i_psnr, i_ssim)
        if ok
    ]


def summarise(rows: list[dict], protocol: str) -> dict:
    """The metrics.json schema. ``mean`` averages the per-weather means, as the papers' Mean column does."""
    by_weather: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_weather[r["weather"]].append(r)

    def table(psnr_key: str, ssim_key: str) -> dict:
        weathers = {w: {"psnr": float(np.mean([r[psnr_key] for r in rs])),
                        "ssim": float(np.mean([r[ssim_key] for r in rs])), "n": len(rs)}
                    for w, rs in sorted(by_weather.items())}
        mean = {m: float(np.mean([v[m] for v in weathers.values()])) if weathers else float("nan")
                for m in ("psnr", "ssim")}
        return {"weathers": weathers, "mean": mean}

    model, identity = table("psnr", "ssim"), table("id_psnr", "id_ssim")
    return {"protocol": protocol, **model, "n": len(rows), "identity": identity}


def triplet(batch: dict, pred: torch.Tensor, i: int = 0) -> np.ndarray:
    """input | prediction | target as one uint8 H×(3W)×3 image."""
    parts = [batch["input"][i], pred[i]] + ([batch["target"][i]] if "target" in batch else [])
    return torch.cat([quantize(p.float()) for p in parts], dim=-1).byte().permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def run(accelerator, predict, loader, weathers: list[str], protocol: str = "rgb", n_images: int = 4,
        to_device=None) -> tuple[dict, list[np.ndarray], int]:
    """Evaluate over a sharded eval loader. Returns (summary, example triplets, corrupt count)."""
    rows, images = [], []
    for batch in loader:
        batch = to_device(batch) if to_device else batch
        with accelerator.autocast():
            pred = predict(batch)
        pred = pred.float().clamp(0, 1)
        rows += _rows(batch, pred, weathers, protocol)
        if len(images) < n_images and bool(batch["valid"][0]):
            images.append(triplet(batch, pred))
    gathered = gather_object(rows) if accelerator.num_processes > 1 else rows
    unique = list({r["key"]: r for r in gathered}.values())  # padding duplicates collapse here
    corrupt = torch.tensor([float(loader.corrupt)], device=accelerator.device)
    if accelerator.num_processes > 1:
        corrupt = accelerator.reduce(corrupt, reduction="sum")
    return summarise(unique, protocol), images, int(corrupt.item())
