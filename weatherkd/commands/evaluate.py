"""`weatherkd eval`: any exported model on any shard set, every sample exactly once.

Run it as one process, or under ``accelerate launch`` to split the samples across ranks. Images
are evaluated at full resolution; with ``--tile`` larger ones go through overlapping tiles.

Writes to ``--out``: ``metrics.json`` (the schema training validation writes, plus what was
evaluated), ``metrics.md``, ``samples.json`` (one row per sample) and ``examples/<weather>.png``
(input | output | target). The model folder's card (``README.md``) gets the table, in a section of
its own per shard set, split and protocol that a rerun replaces.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import PartialState
from PIL import Image

from weatherkd import models, tracking
from weatherkd.config import TrackerConfig
from weatherkd.data.shards import open_set
from weatherkd.data import stream
from weatherkd.data.stream import eval_loader
from weatherkd.engine import validate
from weatherkd.placement import make_accelerator
from weatherkd.errors import UserError
from weatherkd.io import atomic_path, atomic_write_json, atomic_write_text
from weatherkd.logs import get_logger
from weatherkd.models import card
from weatherkd.models.tiling import tiled

log = get_logger(__name__)


def default_out(model_dir: Path, shards: Path, split: str, protocol: str) -> Path:
    """Next to the model's run: ``<run>/eval/<shard set>-<split>-<protocol>``."""
    return model_dir.resolve().parent / "eval" / f"{shards.resolve().name}-{split}-{protocol}"


def markdown(summary: dict, title: str) -> str:
    """One model's per-weather table, identity beneath it."""
    weathers = list(summary["weathers"])
    head = "| | " + " | ".join(weathers) + " | mean |\n|---|" + "---|" * (len(weathers) + 1) + "\n"

    def row(name: str, table: dict) -> str:
        cells = [f"{table['weathers'][w]['psnr']:.2f} / {table['weathers'][w]['ssim']:.4f}" for w in weathers]
        mean = f"{table['mean']['psnr']:.2f} / {table['mean']['ssim']:.4f}"
        return f"| {name} | " + " | ".join(cells) + f" | {mean} |\n"

    random_note = " — **random weights**" if summary.get("random_init") else ""
    clean = summary.get("clean_in")
    clean_line = (f"\nClean in (each clean target as the input): PSNR {clean['psnr']:.2f} dB of the output against "
                  f"it, {clean['min']:.2f} dB at worst.\n" if clean else "")
    return (f"### {title}{random_note}\n\nPSNR (dB) / SSIM, protocol `{summary['protocol']}`, "
            f"{summary['n']} samples\n\n" + head + row(title, summary) + row("identity", summary["identity"])
            + clean_line + removal_markdown(summary.get("removal", {})))


def removal_markdown(removal: dict) -> str:
    """Where each weather's PSNR change comes from: the weather removed, and what the weather left
    untouched, damaged (validate.removal)."""
    if not removal:
        return ""
    lines = [f"| {w} | {100 * r['weather_pixels']:.0f}% | " + " | ".join(validate.removal_cells(r)) + " |"
             for w, r in removal.items()]
    return ("\nRemoval and damage (RGB): the share of pixels the weather changed, the share of the input's "
            "squared error there that the model took away, and the PSNR over the pixels the weather left "
            "exact (identity: exact).\n\n| weather | weather pixels | removed | untouched PSNR |\n"
            "|---|---|---|---|\n" + "\n".join(lines) + "\n")


def evaluate(model_dir, shards, out=None, protocol: str = "rgb", split: str = "test", tile: int = 0,
             overlap: int = 32, max_samples: int = 0, num_workers: int = 1, tracker: str = "auto") -> dict:
    """``tracker``: wandb logs the per-weather table and examples to a W&B run (job type eval) in
    the pipeline's group; auto does so inside a pipeline ($WEATHERKD_PIPELINE set); none never."""
    model_dir, shards = Path(model_dir).resolve(), Path(shards).resolve()
    if tile and not 0 <= overlap < tile:
        raise UserError(f"--overlap must be at least 0 and below --tile ({tile}), got {overlap}")
    spec = models.verify(model_dir)  # a damaged export fails here, before any launch work
    shard_set = open_set(shards, split)  # a missing set or split fails here, naming it
    out = Path(out) if out else default_out(model_dir, shards, split, protocol)

    acc = make_accelerator()
    model = models.load(model_dir).to(acc.device).eval()
    loader = eval_loader(shards, split, None, acc.process_index, acc.num_processes, num_workers, max_samples)

    def predict(batch):
        x = batch["input"].float()
        return tiled(model, x, tile, overlap) if tile else model(x)

    result = validate.run(acc, predict, loader, shard_set.weathers, protocol,
                          to_device=lambda b: stream.to_device(b, acc.device), clean_in=True)
    if result.summary["n"] == 0:
        raise UserError(f"{shards}/{split}: no sample has a target (clean image), so there is nothing to score")
    summary = {**result.summary, "corrupt_skipped": result.corrupt, "random_init": bool(spec.get("random_init")),
               "model": str(model_dir), "arch": spec["arch"], "shards": str(shards), "split": split,
               "tile": tile, "world_size": acc.num_processes}
    if acc.is_main_process:
        _write(out, summary, result, title=model_dir.resolve().parent.name)
        try:  # the model's card gets this evaluation's table (its own section, replaced on a rerun)
            card.add_evaluation(model_dir, summary, out)
        except OSError as e:  # a read-only model folder: the results are in `out` all the same
            log.warning("the model card in %s was not updated (%s); the results are in %s", model_dir, e, out)
        if tracking.wanted(tracker):
            columns = ["model", "weather", "psnr", "ssim", "n", "identity_psnr", "identity_ssim"]
            name = model_dir.parent.name
            rows = [[name, w, v["psnr"], v["ssim"], v["n"], summary["identity"]["weathers"][w]["psnr"],
                     summary["identity"]["weathers"][w]["ssim"]] for w, v in summary["weathers"].items()]
            rows.append([name, "mean", summary["mean"]["psnr"], summary["mean"]["ssim"], summary["n"],
                         summary["identity"]["mean"]["psnr"], summary["identity"]["mean"]["ssim"]])
            tracking.log_tables("eval", out, {"eval/per_weather": (columns, rows)},
                                {f"eval/examples/{w}": img for w, img in result.examples.items()},
                                TrackerConfig(name=f"{tracking.pipeline_group() or 'eval'}/eval-{name}"))
        log.info("eval %s on %s/%s: PSNR %.2f dB (identity %.2f), SSIM %.4f over %d samples -> %s", model_dir,
                 shards, split, summary["mean"]["psnr"], summary["identity"]["mean"]["psnr"],
                 summary["mean"]["ssim"], summary["n"], out)
    acc.wait_for_everyone()
    return summary


def _write(out: Path, summary: dict, result: validate.Result, title: str) -> None:
    (out / "examples").mkdir(parents=True, exist_ok=True)
    for weather, image in result.examples.items():
        with atomic_path(out / "examples" / f"{weather}.png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
    atomic_write_json(out / "samples.json", result.rows)
    atomic_write_text(out / "metrics.md", markdown(summary, title))
    atomic_write_json(out / "metrics.json", summary)  # last: its presence means the folder is complete


def outputs(model_dirs: list, out, shards, split: str, protocol: str) -> list[Path]:
    """Where each model's evaluation goes: ``--out`` itself for one model; for several, one folder
    per model's run (``OUT/<run>``) under ``--out``, or the default beside each run."""
    dirs = [Path(m) for m in model_dirs]
    if len(dirs) == 1:
        return [Path(out) if out else default_out(dirs[0], Path(shards), split, protocol)]
    if out is None:
        return [default_out(d, Path(shards), split, protocol) for d in dirs]
    names = [d.resolve().parent.name for d in dirs]
    if len(set(names)) < len(names):
        raise UserError(f"--out {out}: several models come from runs named alike ({', '.join(names)}); "
                        "evaluate them one at a time with their own --out")
    return [Path(out) / name for name in names]


def run_cli(args) -> int:
    """Several ``--model``s are evaluated one after another in this launch: one process start-up
    for all of them."""
    for model_dir in args.model:
        models.verify(model_dir)  # every folder is checked before the first evaluation starts
    for model_dir, out in zip(args.model, outputs(args.model, args.out, args.shards, args.split, args.protocol)):
        summary = evaluate(model_dir, args.shards, out, args.protocol, args.split, args.tile, args.overlap,
                           args.max_samples, args.workers, args.tracker)
        if PartialState().is_main_process:  # one summary per model, not one per rank
            print(json.dumps({"model": str(model_dir), "mean": summary["mean"], "identity": summary["identity"]["mean"],
                              "n": summary["n"], "protocol": summary["protocol"],
                              "random_init": summary["random_init"]}))
    return 0
