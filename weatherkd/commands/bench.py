"""`weatherkd bench <what>`: benchmarks that print one JSON object on stdout.

Figures are compared within one run (ratios), because the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from weatherkd import stages
from weatherkd.data.augment import paired_crop_flip
from weatherkd.data.check import iter_tar
from weatherkd.data.shards import open_set
from weatherkd.data.stream import TrainSpec, train_loader
from weatherkd.errors import UserError
from weatherkd.placement import make_accelerator, place
from weatherkd.precision import dtype_named


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


def bench_loader(argv: list[str]) -> dict:
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


def _timed_steps(engine, batches, steps: int, window) -> float:
    """Wall seconds of ``steps`` real engine steps, the device synchronised around them; the steps'
    data and step times add up in ``window``."""
    from weatherkd import cost

    cost.sync(engine.acc.device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.train_step(batches, window)
    cost.sync(engine.acc.device)
    return time.perf_counter() - start


STEP_PARTS = ["distill/student_forward", "distill/teacher", "distill/consistency_teacher", "distill/dckd_negatives",
              "distill/dckd_history", "distill/dckd_vq_frozen", "distill/dckd_vq_student", "distill/dckd_contrast", "distill/dckd_dmm",
              "engine/backward", "engine/optimizer", "engine/ema", "distill/history_update"]


CONSISTENCY_BASES = ("kd_online", "kd_cached", "dckd_online", "dckd_cached")  # timed with and without it


def bench_kd_overhead(argv: list[str]) -> dict:
    """Seconds per step of the engine's real ``train_step`` (EMA and the history update included)
    for scratch, kd and dckd on one student, batch and machine, in one run; kd and dckd with the
    teacher online and from its cache (`weatherkd teach` on the first shards, untimed); dckd online
    also with its negatives in bf16 (``dckd.frozen_precision``) when training in fp32, and with its
    terms compiled (``dckd.compile``) where torch.compile can build; kd and dckd, online and cached,
    also with the consistency term (``consistency.objectives``; from the cache its teacher still
    runs online), which the others go without whatever the config says. Each step's time is split
    into its parts by the recipe's and engine's ``record_function`` labels."""
    from torch.profiler import ProfilerActivity, profile

    from weatherkd import config as cfgmod
    from weatherkd import cost
    from weatherkd.engine.loop import Engine, Window
    from weatherkd.jobs import teach
    from weatherkd.recipes.distill import RECIPE, Config, compiler_missing

    p = argparse.ArgumentParser(prog="weatherkd bench kd-overhead")
    p.add_argument("--config", default="configs/distill/demo.yaml")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each kind, taken in turn; the median counts")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--teach-shards", type=int, default=2, help="shards of the training set the cache is made of")
    p.add_argument("--profile-steps", type=int, default=3, help="steps profiled for the split into parts")
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    base = cfgmod.load(Config, a.config, a.overrides)
    if not base.teacher:
        raise UserError(f"{a.config}: teacher is not set; the kd steps need an exported teacher")
    # The engines' precision first: the teach job below only places itself, and accelerate lets a
    # process choose its precision once.
    make_accelerator(base.train.mixed_precision)
    result = {"bench": "kd-overhead", "student": base.model.arch, "size": base.model.size, "batch_size":
              base.data.batch_size, "crop": base.data.crop, "threads": torch.get_num_threads(),
              "seconds_per_step": {}, "ms_per_step_by_part": {}}
    with tempfile.TemporaryDirectory() as tmp:
        subset = _first_shards(base.data.train_shards, base.data.train_split, a.teach_shards, Path(tmp) / "subset")
        taught = Path(tmp) / "taught"
        teach.Teach(cfgmod.load(teach.Config, None, [f"out_dir={taught}", f"teacher={base.teacher}",
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
                engine.train_step(batches, Window())
            engines[name] = (engine, batches, Window(), [])
        # Round robin, one step of each in turn: a shared machine's slow spells hit every kind
        # alike, and the median step ignores the spikes.
        for _ in range(a.steps):
            for engine, batches, window, seconds in engines.values():
                seconds.append(_timed_steps(engine, batches, 1, window))
        for name, (engine, batches, window, seconds) in engines.items():
            device = engine.acc.device
            result["seconds_per_step"][name] = float(np.median(seconds))
            result.setdefault("data_wait_frac", {})[name] = window.data_s / window.total_s
            cuda = device.type == "cuda"  # on a GPU a part's time is its kernels', not its launches
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:  # separate steps: profiling slows them
                for _ in range(a.profile_steps):
                    engine.train_step(batches, Window())
                cost.sync(device)
            totals = {e.key: (e.device_time_total if cuda else e.cpu_time_total) / 1e3 / a.profile_steps
                      for e in prof.key_averages() if e.key in STEP_PARTS}
            result["ms_per_step_by_part"][name] = {k: totals[k] for k in STEP_PARTS if k in totals}
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


def bench_model(argv: list[str]) -> dict:
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


def bench_step(argv: list[str]) -> dict:
    """Training throughput and MFU of a stage's real engine step, in one process.

    FLOPs are counted by ``torch.utils.flop_counter`` over one whole step (forward, backward and
    every frozen helper's forward); the peak is a dense matmul in the compute dtype, timed in the
    same run on the same threads. Data loading is inside the timed steps, as in training.
    """
    from weatherkd import config as cfgmod
    from weatherkd import cost
    from weatherkd.engine.loop import Engine, Window
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
        batches, window = engine.train_batches(), Window()
        for _ in range(a.warmup):
            engine.train_step(batches, window)
        counter = FlopCounterMode(display=False)
        with counter:
            engine.train_step(batches, Window())
        window = Window()
        seconds = _timed_steps(engine, batches, a.steps, window)
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


def bench_synth(argv: list[str]) -> dict:
    """Our batched img2img against diffusers' stock StableDiffusionImg2ImgPipeline called one image at a
    time: same model, steps, strength and images, in one run."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from weatherkd import cost
    from weatherkd.models import diffusion

    p = argparse.ArgumentParser(prog="weatherkd bench synth")
    p.add_argument("--sd-path", required=True, help="local diffusers Stable Diffusion folder")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--strength", type=float, default=0.6)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    a = p.parse_intermixed_args(argv)
    device = place().device
    dtype = dtype_named(a.dtype, device)
    sd = diffusion.load(a.sd_path, device, dtype)
    images = torch.rand(a.images, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    prompts = torch.randn(a.images, 8, sd.prompt_width, generator=torch.Generator().manual_seed(1))

    def ours():
        for i in range(0, a.images, a.batch_size):
            gens = [torch.Generator(device).manual_seed(k) for k in range(i, min(i + a.batch_size, a.images))]
            diffusion.img2img(sd, images[i:i + a.batch_size], prompts[i:i + a.batch_size], a.strength, a.steps, gens)

    pipe = StableDiffusionImg2ImgPipeline(vae=sd.vae, text_encoder=None, tokenizer=None, unet=sd.unet,
                                          scheduler=sd.scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def stock():
        for i in range(a.images):
            pipe(image=images[i:i + 1], prompt_embeds=prompts[i:i + 1].to(device, dtype),
                 negative_prompt_embeds=torch.zeros_like(prompts[i:i + 1]).to(device, dtype), strength=a.strength,
                 num_inference_steps=a.steps, guidance_scale=1.0, output_type="pt",
                 generator=torch.Generator(device).manual_seed(i))

    timings = {}
    for name, fn in (("weatherkd_batched", ours), ("diffusers_one_by_one", stock)):
        fn()  # warm-up
        cost.sync(device)
        start = time.perf_counter()
        fn()
        cost.sync(device)
        timings[name] = a.images / (time.perf_counter() - start)
    return {"bench": "synth", "device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(),
            "images": a.images, "batch_size": a.batch_size, "size": a.size, "steps": a.steps,
            "strength": a.strength, "images_per_s": timings,
            "speedup": timings["weatherkd_batched"] / timings["diffusers_one_by_one"]}


BIG = ("medium", "large")  # the allweather students: also timed at 512², and held to the goals
GOALS = {"int8_over_onnxruntime": 2.0, "int8_over_eager": 3.0}  # CPU, the big students at 512² and 1024²


def _bench_model(name: str, tmp: Path):
    """A model folder, or ``arch:size`` built with random weights (the timing does not depend on
    them); returns (folder, is a big student)."""
    from weatherkd import models

    if Path(name).is_dir():
        spec = models.read_spec(name)
        size = spec["kwargs"].get("size") or spec["kwargs"].get("base", {}).get("kwargs", {}).get("size")
        return Path(name), size in BIG
    arch, _, size = name.partition(":")
    if arch not in ("unet_bn", "nafnet") or not size:
        raise UserError(f"bench export: --model {name}: a model folder, or ARCH:SIZE of a student (unet_bn:tiny, nafnet:large)")
    torch.manual_seed(0)
    net = models.build(arch, size=size)
    for pname, p in net.named_parameters():  # the students start as the identity: every block made to count
        if pname.endswith(("beta", "gamma")) or pname.startswith(("out.0.weight", "ending.0.weight")):
            torch.nn.init.normal_(p, 0, 0.02)
    return models.save(net, tmp / name.replace(":", "-"), extra={"random_init": True}), size in BIG


def _builtin_calibration(n: int = 8, side: int = 256):
    """Crops of the shipped training photos: timing needs a calibrated graph, not a trained one."""
    from weatherkd.data.photo_set import builtin_train_photos, read_builtin
    from weatherkd.models.reduced import Calibration

    images = [photo[:side, :side].transpose(2, 0, 1)[None].copy() for _, photo in read_builtin(builtin_train_photos()[:n])]
    return Calibration(images, {"set": "builtin training photos", "samples": len(images), "side": side})


def _ort_profile(runner, x: torch.Tensor, top: int = 8) -> dict:
    """Milliseconds per op type over one run after a warm-up, from onnxruntime's own profiler."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(runner.path), opts, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        session.run(None, feed)
        session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[-1]:
            per_op[e["args"]["op_name"]] = per_op.get(e["args"]["op_name"], 0.0) + e["dur"] / 1e3
    total = sum(per_op.values())
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    return {"kernel_ms": total, "top_ms": {k: round(v, 2) for k, v in ranked[:top]},
            "top_share": {k: round(v / total, 3) for k, v in ranked[:top]}}


def bench_export(argv: list[str]) -> dict:
    """Median latency of each student as PyTorch eager, ``torch.compile``, onnxruntime fp32 and
    onnxruntime int8, in one run (CPU); each as a ratio to eager, and int8 to onnxruntime fp32.
    The big students (nafnet medium, large) are also timed at 512² and held to the goals (int8
    ≥ 2× onnxruntime fp32 and ≥ 3× eager at 512² and 1024²); where one is missed, onnxruntime's
    profile per op type of both graphs says where the time goes."""
    from torch.utils import benchmark

    from weatherkd import models
    from weatherkd.models import deployed
    from weatherkd.commands import export
    from weatherkd.models import reduced

    p = argparse.ArgumentParser(prog="weatherkd bench export")
    p.add_argument("--model", nargs="+", default=["unet_bn:tiny", "nafnet:tiny", "nafnet:medium", "nafnet:large"],
                   help="model folders, or ARCH:SIZE students built with random weights (default: the demo's "
                        "students and the allweather ones at real size)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="image sides (big students: and 512)")
    p.add_argument("--calib-shards", default=None, help="int8 calibration set (default: crops of the shipped photos)")
    p.add_argument("--rounds", type=int, default=7, help="timed calls of each runner, taken in turn; the median counts")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes per size on a small CPU)")
    a = p.parse_intermixed_args(argv)
    threads = torch.get_num_threads()
    # torch's OpenMP workers spin between ops unless OMP_WAIT_POLICY=PASSIVE (read at start-up): on
    # a CPU shared with other jobs that made eager up to 10x slower here, onnxruntime (which
    # `deployed` keeps from spinning) not. Recorded, so a ratio is read with it.
    result = {"bench": "export", "device": "cpu", "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "goals": GOALS, "models": {}, "not_run": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in a.model:
            model_dir, big = _bench_model(name, tmp)
            spec = models.read_spec(model_dir)
            model = models.load(model_dir).eval()
            model.requires_grad_(False)
            fp32_file, int8_file = tmp / f"{model_dir.name}.onnx", tmp / f"{model_dir.name}-int8.onnx"
            record = export.export(model_dir, "onnx", fp32_file)  # checked against PyTorch, as always
            if a.calib_shards:
                calibration = export._shard_samples(a.calib_shards, export.CALIB_SAMPLES)[0]
            else:
                calibration = _builtin_calibration()
            ops = reduced.to_int8(fp32_file, int8_file, calibration)
            runners = {"eager": model, "onnxruntime": deployed.OnnxModel(fp32_file, torch.device("cpu")),
                       "onnxruntime_int8": deployed.OnnxModel(int8_file, torch.device("cpu"))}
            sizes = sorted(set(a.sizes) | ({512} if big else set()))
            entry = {"arch": spec["arch"], "rounds": a.rounds, "kwargs": spec["kwargs"], "random_init": bool(spec.get("random_init")),
                     "onnx_max_abs_error": max(record["check"]["max_abs_error"]), "int8_ops": ops, "median_ms": {},
                     "speedup_over_eager": {}, "int8_over_onnxruntime": {}, "int8_psnr_vs_fp32_db": {}}
            for size in sizes:
                x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
                timed = dict(runners)
                if not a.no_compile:
                    try:  # one graph per size: the dynamic one fails on the padding
                        compiled = torch.compile(model, dynamic=False)
                        with torch.no_grad():
                            compiled(x)
                        timed["compile"] = compiled
                    except Exception as e:  # no compiler toolchain, or an op inductor cannot take: reported
                        result["not_run"][f"{name}@{size}/compile"] = " ".join(str(e).split())[:200] or type(e).__name__
                with torch.no_grad():
                    timers = {}
                    for runner_name, fn in timed.items():
                        fn(x)  # warm-up
                        timers[runner_name] = benchmark.Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=threads)
                    # Round robin, one call of each in turn: a shared machine's slow spells hit every
                    # runner alike, and the median call ignores the spikes.
                    calls: dict[str, list[float]] = {k: [] for k in timers}
                    for _ in range(a.rounds):
                        for runner_name, timer in timers.items():
                            calls[runner_name].append(timer.timeit(1).median * 1e3)
                    ms = {k: float(np.median(v)) for k, v in calls.items()}
                    int8_out, fp32_out = runners["onnxruntime_int8"](x), runners["onnxruntime"](x)
                torch._dynamo.reset()  # the compiled graphs of this size are not needed again
                key = str(size)
                entry["median_ms"][key] = ms
                entry["speedup_over_eager"][key] = {k: ms["eager"] / v for k, v in ms.items() if k != "eager"}
                entry["int8_over_onnxruntime"][key] = ms["onnxruntime"] / ms["onnxruntime_int8"]
                entry["int8_psnr_vs_fp32_db"][key] = export._psnr(int8_out, fp32_out)
                if big and size >= 512:
                    met = {"int8_over_onnxruntime": entry["int8_over_onnxruntime"][key] >= GOALS["int8_over_onnxruntime"],
                           "int8_over_eager": entry["speedup_over_eager"][key]["onnxruntime_int8"] >= GOALS["int8_over_eager"]}
                    entry.setdefault("goals_met", {})[key] = met
                    if not all(met.values()):
                        entry.setdefault("profile", {})[key] = {"onnxruntime": _ort_profile(runners["onnxruntime"], x),
                                                               "onnxruntime_int8": _ort_profile(runners["onnxruntime_int8"], x)}
            result["models"][name] = entry
            print(json.dumps({name: entry["median_ms"]}), file=sys.stderr, flush=True)  # progress: minutes per model
    return result


BENCHES = {"loader": bench_loader, "kd-overhead": bench_kd_overhead, "model": bench_model, "step": bench_step,
           "synth": bench_synth, "export": bench_export}
assert list(BENCHES) == stages.BENCH_NAMES  # the registry lists them for the command line


def run_cli(args) -> int:
    with _stdout_to_stderr():
        result = BENCHES[args.what](args.rest)
    print(json.dumps(result, indent=2))
    return 0


@contextlib.contextmanager
def _stdout_to_stderr():
    """Keep stdout pure JSON: libraries (DeepSpeed's logger, for one) print there while a bench runs.

    Works at the file-descriptor level, so handlers that captured ``sys.stdout`` earlier and native
    code are redirected too.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        _flush_c_stdio()  # native code's buffered output must land on stderr, before the JSON
        os.dup2(saved, 1)
        os.close(saved)


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
