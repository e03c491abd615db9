"""The ``weatherkd`` command line: argument parsing only; each subcommand calls into its stage."""

from __future__ import annotations

import argparse
import importlib
import sys

from weatherkd import __version__
from weatherkd.errors import UserError

# Config-driven stages: `weatherkd <stage> --config FILE [key=value ...]`.
# A stage whose module does not exist yet says so and exits 2.
TRAINING_STAGES = {
    "teacher": "train the CLIP-guided weather-removal teacher (DeepSpeed ZeRO)",
    "distill": "distil a student from an exported teacher (KD / DCKD, DDP)",
    "vq": "train the VQ autoencoder used by DCKD",
    "adapter": "train the D4IR degradation-prompt adapter",
    "synth": "synthesise distillation tars with degradation-prompted Stable Diffusion",
    "dream": "synthesise distillation tars by inverting the teacher",
    "prune": "adaptively prune a trained network into a student initialisation",
}

# Commands that are not a training stage, and the module whose run_cli(args) carries them out.
COMMAND_MODULES = {"eval": "weatherkd.stages.evaluate", "report": "weatherkd.report", "demo": "weatherkd.demo"}

NOT_BUILT_EXIT = 2


class NotBuilt(Exception):
    """Raised by a subcommand whose implementation has not landed yet."""


def _not_built(what: str):
    raise NotBuilt(f"weatherkd {what}: not built yet. See the open issues; nothing was run.")


def _stage_module(name: str):
    try:
        return importlib.import_module(f"weatherkd.stages.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"weatherkd.stages.{name}" or e.name == "weatherkd.stages":
            _not_built(name)
        raise


def _run_training_stage(args) -> int:
    from weatherkd import config as cfgmod

    module = _stage_module(args.stage)
    cfg = cfgmod.load(module.Config, args.config, args.overrides)
    return module.run(cfg) or 0


def _add_shards(sub) -> None:
    p = sub.add_parser("shards", help="build, ingest, inspect and check WebDataset shard sets")
    ssub = p.add_subparsers(dest="shards_cmd", required=True, metavar="{synth,ingest,inspect,leakage}")

    s = ssub.add_parser("synth", help="degrade clean photos with physical weather models into a train/test set")
    s.add_argument("--out", required=True, help="shard-set directory to create")
    s.add_argument("--source", default="builtin", help="'builtin' (scikit-image photos) or a folder of images")
    s.add_argument("--weathers", nargs="+", default=None, help="weathers to synthesise (default: all canonical)")
    s.add_argument("--train", type=int, default=None, help="training crops per weather")
    s.add_argument("--test", type=int, default=None, help="held-out photos (whole images) in the test split")
    s.add_argument("--size", type=int, default=None, help="training crop size in pixels")
    s.add_argument("--test-size", type=int, default=None, help="longest side of test images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=None, help="samples per tar")
    s.add_argument("--overwrite", action="store_true", help="replace an existing complete set")
    s.add_argument("--skip-bad", action="store_true",
                   help="skip, count and list (in the manifest) source images that cannot be read")

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

    s = ssub.add_parser("inspect", help="counts per split/weather; verify checksums and decoding (exit 1 on corruption)")
    s.add_argument("dir")

    s = ssub.add_parser("leakage", help="near-duplicate targets across two sets (exit 1 when leaks are found)")
    s.add_argument("train")
    s.add_argument("test")
    s.add_argument("--max-distance", type=int, default=None, help="Hamming distance at which hashes match")


def _run_shards(args) -> int:
    try:
        from weatherkd.data import cli as shards_cli
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("weatherkd.data"):
            _not_built("shards")
        raise
    return shards_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weatherkd",
        description="Distil CLIP-guided multi-weather restoration teachers into small, fast students.",
    )
    parser.add_argument("--version", action="version", version=f"weatherkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    _add_shards(sub)
    for name, help_text in TRAINING_STAGES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, help=f"YAML under configs/{name}/")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
        p.set_defaults(stage=name)

    p = sub.add_parser("eval", help="evaluate an exported model on a shard set (accelerate launch splits it)")
    p.add_argument("--model", required=True, help="exported model directory (model.json + model.safetensors)")
    p.add_argument("--shards", required=True, help="shard-set directory")
    p.add_argument("--protocol", default="rgb", choices=["rgb", "y"], help="PSNR/SSIM protocol (see metrics.py)")
    p.add_argument("--out", default=None, help="default: <run>/eval/<shards>-<split>-<protocol>")
    p.add_argument("--split", default="test")
    p.add_argument("--tile", type=int, default=0, help="tile size for large images (0: whole images)")
    p.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels")
    p.add_argument("--max-samples", type=int, default=0, help="evaluate only the first N samples (0: all)")
    p.add_argument("--workers", type=int, default=1, help="loader workers per process")

    p = sub.add_parser("bench", help="benchmarks, printed as JSON")
    p.add_argument("what", help="loader | model | step | kd-overhead | synth")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("report", help="gather several runs into one comparison table (markdown + JSON)")
    p.add_argument("runs", nargs="+", help="run directories (out_dir of a stage) or `weatherkd eval` outputs")
    p.add_argument("--out", default=None, help="markdown file to write; the JSON goes next to it")
    p.add_argument("--latency-size", type=int, default=256, help="image side for the latency column")

    p = sub.add_parser("demo", help="the whole pipeline on the embedded default data; rerun to resume")
    p.add_argument("--out", default=None, help="runs, evaluations, logs and the report (default: runs/demo)")
    p.add_argument("--shards", default=None, help="where the default shard set is built (default: shards/demo)")
    p.add_argument("--sd-path", default=None,
                   help="local diffusers Stable Diffusion folder: adds the data-free D4IR student (real weights only)")
    p.add_argument("--quick", action="store_true",
                   help="a few steps per stage on a tiny set, to check an install in minutes "
                        "(default paths runs/demo-quick, shards/demo-quick)")
    return parser


def _run_bench(args) -> int:
    from weatherkd import bench

    return bench.run(args.what, args.rest)


def _dispatch(args) -> int:
    if args.command == "shards":
        return _run_shards(args)
    if args.command in TRAINING_STAGES:
        return _run_training_stage(args)
    if args.command == "bench":
        return _run_bench(args)
    module = importlib.import_module(COMMAND_MODULES[args.command])
    return module.run_cli(args) or 0


def main(argv: list[str] | None = None) -> int:
    from weatherkd import logs

    logs.setup()
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except NotBuilt as e:
        print(str(e), file=sys.stderr)
        return NOT_BUILT_EXIT
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
