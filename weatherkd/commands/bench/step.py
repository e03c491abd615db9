"""`weatherkd bench step`: seconds per real engine step of any training stage."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from weatherkd import stages
from weatherkd.errors import UserError
from weatherkd.commands.bench import timed_steps


def run(argv: list[str]) -> dict:
    """Training throughput and MFU of a stage's real engine step, in one process.

    FLOPs are counted by ``torch.utils.flop_counter`` over one whole step (forward, backward and
    every frozen helper's forward); the peak is a dense matmul in the compute dtype, timed in the
    same run on the same threads. Data loading is inside the timed steps, as in training.
    """
    from weatherkd import config as cfgmod
    from weatherkd import cost
    from weatherkd.engine.loop import Engine
    from weatherkd.engine.progress import Window
    from torch.utils.flop_counter import FlopCounterMode

    p = argparse.ArgumentParser(prog="weatherkd bench step")
    p.add_argument("--config", required=True)
    p.add_argument("--stage", default=None, help="default: the config's folder name (configs/<stage>/...)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    stage = a.stage or Path(a.config).resolve().parent.name
    trainable = stages.of_kind("train")
    if stage not in trainable:
        raise UserError(f"bench step times the engine's training step; {a.config} is a '{stage}' config "
                        f"(pass --stage if its folder does not say): it can bench {', '.join(trainable)}")
    module = stages.get(stage).load()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = cfgmod.load(module.Config, a.config, [*a.overrides, f"out_dir={tmp}", "tracker.kind=none"])
        engine = Engine(cfg, module.RECIPE, stage)
        engine.build()
        batches = engine.train_batches()
        for _ in range(a.warmup):
            engine.train_step(batches)
        counter = FlopCounterMode(display=False)
        with counter:
            engine.train_step(batches)
        window = Window()
        seconds = timed_steps(engine, batches, a.steps, window)
        device = engine.acc.device
        peak = cost.matmul_peak_flops(device, engine.precision.compute_dtype)
    flops = counter.get_total_flops()
    achieved = flops * a.steps / seconds
    return {"bench": "step", "stage": stage, "config": a.config, "arch": cfg.model.arch, "size": cfg.model.size,
            "device": str(device), "threads": torch.get_num_threads(), "dtype": str(engine.precision.compute_dtype),
            "batch_size": cfg.data.batch_size, "crop": cfg.data.crop, "steps": a.steps,
            "seconds_per_step": seconds / a.steps, "samples_per_s": window.samples / seconds,
            "data_wait_frac": window.data_s / seconds, "gflops_per_step": flops / 1e9,
            "achieved_gflops_per_s": achieved / 1e9, "matmul_peak_gflops_per_s": peak / 1e9, "mfu": achieved / peak}
