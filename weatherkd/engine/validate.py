"""Sharded validation: every rank evaluates its slice, rows are gathered and de-duplicated by key."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate.utils import gather_object

from weatherkd.data import stream
from weatherkd.metrics import psnr_batch, quantize, ssim_batch, weather_split
from weatherkd.precision import autocast


def _rows(batch: dict, pred: torch.Tensor, weathers: list[str], protocol: str,
          clean_pred: torch.Tensor | None = None) -> list[dict]:
    valid = batch["valid"].tolist()
    if "target" not in batch or not any(valid):
        return []
    target, inp = batch["target"].float(), batch["input"].float()
    p_psnr, p_ssim = psnr_batch(pred, target, protocol), ssim_batch(pred, target, protocol)
    i_psnr, i_ssim = psnr_batch(inp, target, protocol), ssim_batch(inp, target, protocol)
    split = {name: v.tolist() for name, v in weather_split(pred, inp, target).items()}
    rows = [
        {"key": k, "weather": weathers[int(w)], "psnr": float(a), "ssim": float(b),
         "id_psnr": float(c), "id_ssim": float(d), **{name: v[i] for name, v in split.items()}}
        for i, (k, w, a, b, c, d) in enumerate(zip(batch["key"], batch["weather"], p_psnr, p_ssim, i_psnr, i_ssim))
    ]
    for r, origin in zip(rows, batch.get("origin", ())):
        if origin:
            r["origin"] = origin
    if clean_pred is not None:  # the clean image in: how far the model moves what needs no restoring
        for r, c in zip(rows, psnr_batch(clean_pred, target, protocol)):
            r["clean_psnr"] = float(c)
    return [r for r, ok in zip(rows, valid) if ok]


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
    summary = {"protocol": protocol, **model, "n": len(rows), "identity": identity}
    if rows and all("se_weather" in r for r in rows):
        summary["removal"] = {w: removal(rs) for w, rs in sorted(by_weather.items())}
    if rows and all("clean_psnr" in r for r in rows):
        per_weather = {w: float(np.mean([r["clean_psnr"] for r in rs])) for w, rs in sorted(by_weather.items())}
        summary["clean_in"] = {"psnr": float(np.mean(list(per_weather.values()))), "weathers": per_weather,
                               "min": float(min(r["clean_psnr"] for r in rows))}
    return summary


def removal(rows: list[dict]) -> dict:
    """Where a weather's PSNR change comes from, over these rows (RGB, whatever the protocol):
    ``removed``, the share of the input's squared error on weather pixels that the model took away
    (1: all of it, 0: none, below 0: it made them worse; None: no weather pixels);
    ``untouched_psnr``, PSNR over the pixels the weather left exact, i.e. the damage (an exact
    copy is clamped as PSNR is, to ~148 dB; None: no such pixels); ``weather_pixels``, the share
    of pixels the weather changed."""
    def total(name: str) -> float:
        return float(sum(r[name] for r in rows))

    weather_se_input, untouched = total("se_weather_input"), total("untouched_values")
    mse_untouched = max(total("se_untouched") / untouched, 1e-10) if untouched else None
    return {"removed": 1 - total("se_weather") / weather_se_input if weather_se_input else None,
            "untouched_psnr": float(10 * np.log10(255**2 / mse_untouched)) if mse_untouched else None,
            "weather_pixels": total("weather_values") / (total("weather_values") + untouched)}


EXACT_DB = 100.0  # above this, an untouched PSNR reads as "exact": 8-bit outputs differ by whole levels


def removal_cells(figures: dict | None) -> tuple[str, str]:
    """``removal``'s figures for one weather as table cells: removed, untouched PSNR."""
    if figures is None:
        return "—", "—"
    removed, untouched = figures["removed"], figures["untouched_psnr"]
    removed_cell = "—" if removed is None else f"{100 * removed:.0f}%".replace("-0%", "0%")
    untouched_cell = "—" if untouched is None else "exact" if untouched > EXACT_DB else f"{untouched:.1f} dB"
    return removed_cell, untouched_cell


def triplet(batch: dict, pred: torch.Tensor, i: int = 0) -> np.ndarray:
    """input | prediction | target as one uint8 H×(3W)×3 image."""
    parts = [batch["input"][i], pred[i]] + ([batch["target"][i]] if "target" in batch else [])
    return torch.cat([quantize(p.float()) for p in parts], dim=-1).byte().permute(1, 2, 0).cpu().numpy()


@dataclass
class Result:
    summary: dict  # the metrics.json schema
    rows: list[dict]  # one per sample, every sample exactly once
    examples: dict[str, np.ndarray] = field(default_factory=dict)  # weather -> input|prediction|target
    corrupt: int = 0


@torch.no_grad()
def run(accelerator, predict, loader, weathers: list[str], protocol: str = "rgb", to_device=None,
        clean_in: bool = False) -> Result:
    """Evaluate over a sharded eval loader: every rank runs its slice, rows are gathered everywhere.
    ``clean_in``: also restore each clean target and score it against itself (``clean_psnr``).

    Examples are the first sample of each weather, gathered from whichever rank saw it.
    """
    rows, examples = [], {}
    for batch in loader:
        batch = to_device(batch) if to_device else stream.to_device(batch, accelerator.device)
        with autocast(accelerator):
            pred = predict(batch)
        pred = pred.float().clamp(0, 1)
        clean_pred = None
        if clean_in and "target" in batch:
            with autocast(accelerator):
                clean_pred = predict({**batch, "input": batch["target"]}).float().clamp(0, 1)
        new_rows = _rows(batch, pred, weathers, protocol, clean_pred)
        rows += new_rows
        if new_rows and new_rows[0]["weather"] not in examples:
            examples[new_rows[0]["weather"]] = (new_rows[0]["key"], triplet(batch, pred))
    if accelerator.num_processes > 1:
        rows = gather_object(rows)
        merged: dict = {}
        for part in gather_object([examples]):  # rank order, so the lowest rank's example wins
            for w, ex in part.items():
                merged.setdefault(w, ex)
        examples = merged
    unique = sorted({r["key"]: r for r in rows}.values(), key=lambda r: r["key"])  # padding collapses here
    corrupt = torch.tensor([float(loader.corrupt)], device=accelerator.device)
    if accelerator.num_processes > 1:
        corrupt = accelerator.reduce(corrupt, reduction="sum")
    return Result(summarise(unique, protocol), unique, {w: img for w, (_, img) in sorted(examples.items())},
                  int(corrupt.item()))
