"""`weatherkd bench model`: one model's forward latency."""

from __future__ import annotations

import argparse

import torch

from weatherkd.placement import place


def run(argv: list[str]) -> dict:
    """Parameters, FLOPs at 256×256, median latency and peak memory of an exported model."""
    from weatherkd import cost, models

    p = argparse.ArgumentParser(prog="weatherkd bench model")
    p.add_argument("model", help="exported model directory")
    p.add_argument("--size", type=int, default=256, help="image side for latency and memory")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    a = p.parse_intermixed_args(argv)
    device = place(a.device).device
    spec = models.read_spec(a.model)
    model = models.load(a.model).to(device).eval()
    peak = cost.peak_memory_mb(model, a.size, a.batch, device)  # first: before other forwards warm the heap
    return {"bench": "model", "model": a.model, "arch": spec["arch"], "random_init": bool(spec.get("random_init")),
            "device": str(device), "threads": torch.get_num_threads(), "params": cost.params(model),
            "gflops_256": cost.flops(model, 256, device) / 1e9,
            "latency_ms": cost.latency_ms(model, a.size, a.batch, a.repeats, device=device),
            "peak_memory": peak, "size": a.size, "batch": a.batch}
