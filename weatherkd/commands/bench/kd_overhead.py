"""`weatherkd bench kd-overhead`: the engine's real step for scratch, kd and dckd, and what each part of it costs."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from weatherkd.data.shards import open_set
from weatherkd.errors import UserError
from weatherkd.placement import make_accelerator
from weatherkd.commands.bench import timed_steps


def _first_shards(shards_dir: str, split: str, n: int, dest: Path) -> Path:
    """A shard set of the first ``n`` shards of ``split`` (links, and a manifest that lists only them)."""
    source = open_set(shards_dir, split)
    chosen = source.shards(split)[:n]
    dest.mkdir(parents=True)
    for s in chosen:
        (dest / s["file"]).symlink_to((source.dir / s["file"]).resolve())  # a relative --shards too
    splits: dict = {}
    for s in chosen:
        splits.setdefault(split, {}).setdefault(s["group"], 0)
        splits[split][s["group"]] += s["count"]
    (dest / "manifest.json").write_text(json.dumps({**source.manifest, "shards": chosen, "splits": splits}))
    return dest


CONSISTENCY_BASES = ("kd_online", "kd_cached", "dckd_online", "dckd_cached")  # timed with and without it


def run(argv: list[str]) -> dict:
    """Seconds per step of the engine's real ``train_step`` (EMA and the history update included)
    for scratch, kd and dckd on one student, batch and machine, in one run; kd and dckd with the
    teacher online and from its cache (`weatherkd cache-teacher` on the first shards, untimed); dckd online
    also with its negatives in bf16 (``dckd.frozen_precision``) when training in fp32, and with its
    terms compiled (``dckd.compile``) where torch.compile can build; kd and dckd, online and cached,
    also with the consistency term (``consistency.objectives``; from the cache its teacher still
    runs online), which the others go without whatever the config says. Each step's time is split
    into its parts by the recipe's and engine's ``record_function`` labels."""
    from torch.profiler import ProfilerActivity, profile

    from weatherkd import config as cfgmod
    from weatherkd import cost
    from weatherkd.engine.loop import Engine
    from weatherkd.engine.progress import Window
    from weatherkd.jobs import teacher_cache
    from weatherkd.recipes.distill import RECIPE, Config, compiler_missing

    p = argparse.ArgumentParser(prog="weatherkd bench kd-overhead")
    p.add_argument("--config", default="configs/distill/demo.yaml")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each kind, taken in turn; the median counts")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cache-shards", type=int, default=2, help="shards of the training set the cache is made of")
    p.add_argument("--profile-steps", type=int, default=3, help="steps profiled for the split into parts")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    base = cfgmod.load(Config, a.config, a.overrides)
    if not base.teacher:
        raise UserError(f"{a.config}: teacher is not set; the kd steps need an exported teacher")
    # The engines' precision first: the cache-teacher job below only places itself, and accelerate lets a
    # process choose its precision once.
    make_accelerator(base.train.mixed_precision)
    result = {"bench": "kd-overhead", "student": base.model.arch, "size": base.model.size, "batch_size":
              base.data.batch_size, "crop": base.data.crop, "threads": torch.get_num_threads(),
              "seconds_per_step": {}, "ms_per_step_by_part": {}}
    with tempfile.TemporaryDirectory() as tmp:
        subset = _first_shards(base.data.train_shards, base.data.train_split, a.cache_shards, Path(tmp) / "subset")
        taught = Path(tmp) / "taught"
        teacher_cache.TeacherCache(cfgmod.load(teacher_cache.Config, None, [f"out_dir={taught}", f"teacher={base.teacher}",
                                                      f"shards={subset}", f"split={base.data.train_split}",
                                                      "slice.index=0", "slice.count=1"])).run()
        cached = [f"data.train_shards={taught}", "data.train_split=train"]  # a taught set's one split
        plain = "consistency.objectives=[]"
        runs = {"scratch": ["objective=scratch", plain], "kd_online": ["objective=kd", plain],
                "kd_cached": ["objective=kd", plain, *cached], "dckd_online": ["objective=dckd", plain],
                "dckd_cached": ["objective=dckd", plain, *cached]}
        if base.train.mixed_precision == "no" and base.dckd.frozen_precision == "train":
            runs["dckd_online_negatives_bf16"] = ["objective=dckd", plain, "dckd.frozen_precision=bf16"]
        if not base.dckd.compile and compiler_missing() is None:  # on top of the fastest eager dckd
            fastest = runs.get("dckd_online_negatives_bf16", runs["dckd_online"])
            runs["dckd_online_compiled"] = [*fastest, "dckd.compile=true"]
        for name in CONSISTENCY_BASES:  # the same four with the consistency term (overrides apply in order)
            runs[f"{name}_consistency"] = [*runs[name], f"consistency.objectives=[{name.split('_')[0]}]"]
        result["overrides"] = runs
        engines = {}
        for name, extra in runs.items():
            torch.manual_seed(0)
            data = [] if "cached" in name else [f"data.train_shards={subset}"]
            cfg = cfgmod.load(Config, a.config, [*a.overrides, *data, *extra, f"out_dir={Path(tmp) / name}",
                                                 "tracker.kind=none", f"data.eval_shards={base.data.eval_shards or base.data.train_shards}"])
            engine = Engine(cfg, RECIPE, "distill")
            engine.build()
            batches = engine.train_batches()
            for _ in range(a.warmup):
                engine.train_step(batches)
            engines[name] = (engine, batches, Window(), [])
        # Round robin, one step of each in turn: a shared machine's slow spells hit every kind
        # alike, and the median step ignores the spikes.
        for _ in range(a.steps):
            for engine, batches, window, seconds in engines.values():
                seconds.append(timed_steps(engine, batches, 1, window))
        parts = [*RECIPE.profile_labels, *Engine.PROFILE_LABELS]  # the labels each side puts on its parts
        for name, (engine, batches, window, seconds) in engines.items():
            device = engine.acc.device
            result["seconds_per_step"][name] = float(np.median(seconds))
            result.setdefault("data_wait_frac", {})[name] = window.data_s / window.total_s
            cuda = device.type == "cuda"  # on a GPU a part's time is its kernels', not its launches
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:  # separate steps: profiling slows them
                for _ in range(a.profile_steps):
                    engine.train_step(batches)
                cost.sync(device)
            totals = {e.key: (e.device_time_total if cuda else e.cpu_time_total) / 1e3 / a.profile_steps
                      for e in prof.key_averages() if e.key in parts}
            result["ms_per_step_by_part"][name] = {k: totals[k] for k in parts if k in totals}
        for _, batches, _, _ in engines.values():
            batches.close()  # their loader workers read from the temporary folder
    t = result["seconds_per_step"]
    result["kd_cached_over_scratch"] = t["kd_cached"] / t["scratch"]
    result["kd_online_over_scratch"] = t["kd_online"] / t["scratch"]
    result["dckd_over_kd_online"] = t["dckd_online"] / t["kd_online"]
    result["dckd_over_kd_cached"] = t["dckd_cached"] / t["kd_cached"]
    if "dckd_online_negatives_bf16" in t:
        result["dckd_negatives_bf16_over_kd_online"] = t["dckd_online_negatives_bf16"] / t["kd_online"]
    if "dckd_online_compiled" in t:
        result["dckd_compiled_over_kd_online"] = t["dckd_online_compiled"] / t["kd_online"]
    result["consistency_over_without"] = {name: t[f"{name}_consistency"] / t[name] for name in CONSISTENCY_BASES}
    return result
