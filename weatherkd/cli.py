"""The ``weatherkd`` command line: argument parsing only; each subcommand calls into its stage."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from weatherkd import __version__, stages
from weatherkd.data.samples import ENCODINGS
from weatherkd.errors import Preempted, UserError


def _run_configured(args) -> int:
    from weatherkd import config as cfgmod

    stage = stages.get(args.command)
    cfg = cfgmod.load(stage.config_class, args.config, args.overrides)
    return stage.load().run(cfg) or 0


def _add_shards(sub) -> None:
    p = sub.add_parser("shards", help=stages.get("shards").help)
    ssub = p.add_subparsers(dest="shards_cmd", required=True, metavar="{synth,heldout,ingest,inspect,leakage}")

    s = ssub.add_parser("synth", help="degrade clean photos with physical weather models into a train/test set")
    s.add_argument("--out", required=True, help="shard-set directory to create")
    s.add_argument("--source", default="builtin",
                   help="'builtin' (real photos shipped in the package, weatherkd/data/photos) or a folder of images")
    s.add_argument("--weathers", nargs="+", default=None, help="weathers to synthesise (default: all canonical)")
    s.add_argument("--train", type=int, default=None, help="training crops per weather")
    s.add_argument("--test", type=int, default=None,
                   help="test samples per weather: views of the held-out photos, each degraded its own way")
    s.add_argument("--severity", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="range of training severities, 1 = the configured weather ranges (default 0.2 1.0)")
    s.add_argument("--zoom", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="range of the photo's scale before a training crop is cut (default 0.25 0.75)")
    s.add_argument("--clean-fraction", type=float, default=None,
                   help="share of training crops left clean, input = target (default 0.15)")
    s.add_argument("--grey-fraction", type=float, default=None,
                   help="share of training crops made greyscale before they are degraded (default 0.2)")
    s.add_argument("--structure-fraction", type=float, default=None,
                   help="share of training crops given thin straight structures (poles, railings, mortar) "
                        "before they are degraded (default 0; docs/results/2026-12-03-thin-structures.md)")
    s.add_argument("--texture-fraction", type=float, default=None,
                   help="share of training crops given fine surface texture (gravel, grass) before they are "
                        "degraded (default 0.3; docs/results/2026-12-07-teacher-recipe-and-texture-damage.md)")
    s.add_argument("--size", type=int, default=None, help="training crop size in pixels")
    s.add_argument("--test-size", type=int, default=None, help="longest side of test images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=None, help="samples per tar")
    s.add_argument("--overwrite", action="store_true", help="replace an existing complete set")
    s.add_argument("--skip-bad", action="store_true",
                   help="skip, count and list (in the manifest) source images that cannot be read")
    s.add_argument("--encoding", choices=ENCODINGS, default="png",
                   help="lossless image encoding: png (any viewer reads it) or qoi (decodes ~5x faster, ~1.2x the bytes)")

    s = ssub.add_parser("heldout", help="a test-only set of other photos, degraded by a second, independent "
                                          "weather generator, from mild to moderate")
    s.add_argument("--out", required=True, help="shard-set directory to create")
    s.add_argument("--source", default="builtin-other",
                   help="'builtin-other' (scikit-image's greyscale photos and the shipped colour photos "
                        "reserved for it; `shards synth` reads none of them) or a folder")
    s.add_argument("--levels", nargs="+", default=None, help="weather levels: mild, moderate (default: both)")
    s.add_argument("--views", type=int, default=None, help="degradations per photo, weather and level (default 2)")
    s.add_argument("--size", type=int, default=None, help="longest side of each image (default 192)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace an existing complete set")

    s = ssub.add_parser("ingest", help="convert an AllWeather/TransWeather or paired-folder dataset to shards")
    s.add_argument("--layout", required=True, choices=["allweather", "paired"])
    s.add_argument("--root", required=True, help="dataset root (allweather) or the input folder (paired)")
    s.add_argument("--list", dest="list_file", help="allweather: txt list of input paths relative to --root")
    s.add_argument("--target-root", help="paired: the folder of clean targets (default: ROOT/../gt)")
    s.add_argument("--out", required=True)
    s.add_argument("--split", default="train")
    s.add_argument("--weather", default=None, help="weather of every sample (default: inferred from the path)")
    s.add_argument("--skip-missing", action="store_true", help="skip and count pairs whose partner is missing")
    s.add_argument("--skip-bad", action="store_true",
                   help="skip, count and list (in the manifest) pairs with an unreadable or truncated image")
    s.add_argument("--shard-size", type=int, default=None)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--encoding", choices=ENCODINGS, default="png",
                   help="lossless image encoding: png (any viewer reads it) or qoi (decodes ~5x faster, ~1.2x the bytes)")

    s = ssub.add_parser("inspect", help="counts per split/weather; verify checksums and decoding (exit 1 on corruption)")
    s.add_argument("dir")

    s = ssub.add_parser("leakage", help="near-duplicate targets across two sets (exit 1 when leaks are found)")
    s.add_argument("train")
    s.add_argument("test")
    s.add_argument("--max-distance", type=int, default=None, help="Hamming distance at which hashes match")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weatherkd",
        description="Distil CLIP-guided multi-weather restoration teachers into small, fast students.",
    )
    parser.add_argument("--version", action="version", version=f"weatherkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    _add_shards(sub)
    for name in stages.configured():
        p = sub.add_parser(name, help=stages.get(name).help)
        p.add_argument("--config", required=True, help=f"YAML under configs/{name}/")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    p = sub.add_parser("eval", help=stages.get("eval").help)
    p.add_argument("--model", required=True, nargs="+", metavar="DIR",
                   help="exported model directories (model.json + model.safetensors); several share one launch")
    p.add_argument("--shards", required=True, help="shard-set directory")
    p.add_argument("--protocol", default="rgb", choices=["rgb", "y"], help="PSNR/SSIM protocol (see metrics.py)")
    p.add_argument("--out", default=None, help="default: <run>/eval/<shards>-<split>-<protocol>; "
                                               "with several models, a folder of one <run> folder each")
    p.add_argument("--split", default="test")
    p.add_argument("--tile", type=int, default=0, help="tile size for large images (0: whole images)")
    p.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels")
    p.add_argument("--max-samples", type=int, default=0, help="evaluate only the first N samples (0: all)")
    p.add_argument("--workers", type=int, default=1, help="loader workers per process")
    p.add_argument("--tracker", default="auto", choices=["auto", "wandb", "none"],
                   help="log the table and examples to W&B (auto: inside a pipeline, i.e. $WEATHERKD_PIPELINE set)")

    p = sub.add_parser("restore", help=stages.get("restore").help)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) and globs")
    p.add_argument("--model", required=True, help="exported model folder, or a file from `weatherkd export`")
    p.add_argument("--out", required=True, help="output folder; inputs' relative folders and stems are kept")
    p.add_argument("--format", default="png", choices=["png", "jpg", "webp"])
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    p.add_argument("--tile", type=int, nargs="+", default=None, metavar="PX",
                   help="tile side (or height width) for large images (default: the model's)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=4, help="images of one size per forward (and tiles per forward)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: fp16 on a GPU, fp32 on the CPU")
    p.add_argument("--compare", action="store_true", help="also write NAME_compare: input | restored")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that exist (default: skip them)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")

    p = sub.add_parser("export", help=stages.get("export").help)
    p.add_argument("--model", required=True, help="exported model folder (model.json + model.safetensors)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="onnx (the one format for now)")
    p.add_argument("--out", default=None, help="default: beside the model folder, <run>/model.<format>")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="a fixed-shape graph (default: dynamic batch, height and width)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16"],
                   help="int8: static quantisation for CPUs (needs --calib-shards); fp16: for GPUs")
    p.add_argument("--calib-shards", default=None, help="int8: a shard set (any kind) to calibrate on and measure with")
    p.add_argument("--calib-samples", type=int, default=32, help="int8: calibration samples (default 32)")
    p.add_argument("--max-psnr-drop", type=float, default=0.2,
                   help="int8: refuse a graph more than this many dB below fp32 against ground truth (default 0.2)")

    p = sub.add_parser("bench", help=stages.get("bench").help)
    p.add_argument("what", choices=stages.BENCH_NAMES, help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="its own flags (weatherkd bench WHAT --help)")

    p = sub.add_parser("plan", help=stages.get("plan").help)
    p.add_argument("--config", required=True, help="a training stage's config (configs/<stage>/<name>.yaml)")
    p.add_argument("--stage", default=None, choices=["teacher", "distill", "vq"], help="default: the config's folder")
    p.add_argument("--launch", default=None, help="accelerate launch file: GPUs, nodes, strategy (default: 8 GPUs)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GB per GPU (default 80)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    p = sub.add_parser("report", help=stages.get("report").help)
    p.add_argument("runs", nargs="+", help="run directories (out_dir of a stage) or `weatherkd eval` outputs; "
                                           "or one report.json, to redraw its page and figures")
    p.add_argument("--out", default=None, help="markdown file to write; the JSON and the HTML page go next to it")
    p.add_argument("--figures-to", default=None, metavar="DIR",
                   help="also write each figure as DIR/<name>.png (frontier, gains, grid, grid-heldout, clean-in)")
    p.add_argument("--latency-size", type=int, default=256, help="image side for the latency column")
    p.add_argument("--diff", action="append", metavar="A:B",
                   help="also show row A minus row B, image by image (repeatable; every row minus identity is shown)")
    p.add_argument("--tracker", default="auto", choices=["auto", "wandb", "none"],
                   help="log the comparison table to W&B (auto: inside a pipeline, i.e. $WEATHERKD_PIPELINE set)")

    p = sub.add_parser("demo", help=stages.get("demo").help)
    p.add_argument("--preset", default="default", choices=["default", "quick", "evidence"],
                   help="default: the demo (~25 min on 2 cores); quick: a few steps per stage on a tiny set, to "
                        "check an install in minutes; evidence: a longer-trained teacher and longer students, "
                        "scratch | kd | kd+consistency | dckd | dckd+consistency over 3 seeds (~2 h on 2 cores)")
    p.add_argument("--quick", action="store_true", help="the same as --preset quick")
    p.add_argument("--out", default=None,
                   help="runs, evaluations, logs and the report (default: runs/demo, runs/demo-<preset>)")
    p.add_argument("--shards", default=None,
                   help="where the default shard set is built (default: shards/demo; quick: shards/demo-quick)")
    p.add_argument("--sd-path", default=None,
                   help="local diffusers Stable Diffusion folder: adds the data-free D4IR student (real weights only)")
    p.add_argument("--seeds", type=int, default=None,
                   help="train every student this many times, with seeds 0..N-1 (default: 1; evidence: 3); the "
                        "report shows mean ± std and paired differences (the teacher and the data it makes are "
                        "built once)")
    return parser


def _dispatch(args) -> int:
    stage = stages.get(args.command)
    if stage.configured:
        return _run_configured(args)
    return stage.load().run_cli(args) or 0


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code (callable in process: it never exits)."""
    from weatherkd import logs

    logs.setup()
    args = build_parser().parse_args(argv)
    try:
        code = _dispatch(args)
    except UserError as e:
        # One write: every rank says it, into one pipe, unbuffered under `python -u`; print()'s
        # separate newline let two ranks' lines run into one.
        sys.stderr.write(f"error: {e}\n")
        code, together = 1, False
    except Preempted as e:  # checkpointed and stopped on purpose: a scheduler requeues on this code
        code, together = e.exit_code, False
    except SystemExit as e:  # a sub-parser's usage error
        if isinstance(e.code, str):
            sys.stderr.write(f"{e.code}\n")
        code, together = e.code if isinstance(e.code, int) else (0 if e.code is None else 1), False
    else:
        together = True
    _leave_process_group(together)
    return code


def entry() -> None:
    """The `weatherkd` program: ``main``, then the exit."""
    try:
        code = main()
    except Exception:
        if not _launched():
            raise
        # A bug, on one rank of a launch: its traceback, then out at once. Left to the
        # interpreter's teardown, a rank that raised could wait forever (DeepSpeed's and the
        # loader's threads), and the launcher with it.
        traceback.print_exc()
        try:
            _leave_process_group(False)
        except Exception:  # whatever the group's state, this rank must still get out
            pass
        code = 1
    if _launched():
        _exit_launched(code)
    sys.exit(code)


def _leave_process_group(together: bool) -> None:
    if "torch.distributed" in sys.modules:  # a command that never loaded torch joined no group
        from weatherkd.placement import leave_process_group

        leave_process_group(together)


def _launched() -> bool:
    """One of several ranks started by a launcher (torchrun, under `accelerate launch`)."""
    from weatherkd import logs

    try:
        return logs.world_size() > 1
    except ValueError:
        return False


def _exit_launched(code: int) -> None:
    """A launched rank exits here, without the interpreter's teardown.

    Teardown destroys what the trainer left (DDP's reducer, gloo's pending work, which hold Python
    objects) while the interpreter is half gone; now and then that aborted a rank whose run had
    succeeded (SIGABRT, so the launch failed). The exit handlers still run first: the run lock's
    release, W&B's, and multiprocessing's, which stops the loader's forkserver.
    """
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a closed pipe or no stream: nothing to save
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
