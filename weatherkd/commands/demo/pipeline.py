"""The demo's pipeline as data: its steps, each a real launch, in order, as a preset sizes them.

    shards synth -> teacher (ZeRO-2) -> cache-teacher (its outputs, once) -> vq (DDP)
      -> distill scratch | kd | dckd (DDP; kd and dckd from the cached outputs)
      -> dream (teacher inversion) -> distill-dream (the data-free student)
      -> prune (the teacher, -45% FLOPs) -> distill-pruned (on the dreamed inputs)
      -> eval (every model, sharded) -> heldout (other photos, another weather generator)
      -> eval-heldout -> report

Every stage is the command a user would type on a cluster, printed before it runs, with its
output in ``OUT/logs/<stage>.log``. A stage whose outputs exist is skipped, and a half-done
training stage resumes from its last checkpoint, so rerunning an interrupted demo continues it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from weatherkd.engine.loop import PROGRESS_FILE
from weatherkd.errors import UserError

ROOT = Path(__file__).resolve().parents[3]  # the checkout: launch/ and configs/ live here
# Student rows: name -> the objective's overrides of configs/distill/demo.yaml. Every row but
# scratch learns from the teacher's cached outputs (`cache-teacher`).
STUDENTS = {"scratch": ("objective=scratch",), "kd": ("objective=kd",), "dckd": ("objective=dckd",)}
@dataclasses.dataclass
class Step:
    name: str
    argv: list[str]  # the command, exactly as run
    done: Path | tuple[Path, ...]  # exist (all of them) once the stage has finished
    steps: int = 0  # training steps, for the progress bar (0: no bar)
    progress: Path | None = None  # the engine's progress record for this stage (out_dir/progress.json)

    def __post_init__(self):
        self.done = (self.done,) if isinstance(self.done, Path) else tuple(self.done)

    def finished(self) -> bool:
        return all(p.exists() for p in self.done)

    def shown(self) -> str:
        """What it wrote: its one output, or the folder holding all of them."""
        return str(self.done[0] if len(self.done) == 1 else Path(os.path.commonpath(self.done)))


def _launcher() -> tuple[str, str, int]:
    """(ZeRO launch config, DDP launch config, processes): every GPU, else 2 CPU processes over gloo."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return "launch/gpu-zero2.yaml", ("launch/gpu-ddp.yaml" if n > 1 else "launch/gpu-1.yaml"), n
    return "launch/cpu-zero2.yaml", "launch/cpu-ddp.yaml", 2


def _accelerate(launch_config: str, nproc: int, *args) -> list[str]:
    return ["accelerate", "launch", "--config_file", launch_config, "--num_processes", str(nproc), "-m",
            "weatherkd", *map(str, args)]


def _max_steps(stage: str, config: str, overrides: list[str]) -> int:
    from weatherkd import config as cfgmod
    from weatherkd import stages

    return cfgmod.load(stages.get(stage).config_class, ROOT / config, overrides).train.max_steps


def seeded(name: str, seed: int) -> str:
    """Seed 0 keeps the stage's name; others get ``-s<seed>``, which `weatherkd report` folds into one row."""
    return name if seed == 0 else f"{name}-s{seed}"


# How `shards synth` makes the training crops look: a finished set the demo reuses must match it.
# (Counts and sizes are the preset's own; `--shards` may point at a set of another size.)
_LOOKS = ("severity", "zoom", "clean_fraction", "grey_fraction", "structure_fraction", "texture_fraction", "rotate",
          "params")


def check_shard_set(shards: Path) -> None:
    """Refuse a finished synth set whose crops an older `shards synth` made otherwise (a default
    changed since): the demo reuses a finished set, and would train on it without a word."""
    from weatherkd.data.photo_set import SynthSpec

    manifest = shards / "manifest.json"
    spec = json.loads(manifest.read_text()).get("created_by", {}).get("spec") if manifest.is_file() else None
    if spec is None:  # nothing built yet, or not a synth set (an ingested one is the user's choice)
        return
    now = json.loads(json.dumps(dataclasses.asdict(SynthSpec())))
    stale = [k for k in _LOOKS if spec.get(k) != now[k]]
    if stale:
        shown = ", ".join(k if k == "params" else f"{k} {spec.get(k, 'unset')} (now {now[k]})" for k in stale)
        raise UserError(f"{shards} was built by an older `shards synth`: {shown}; delete it (or pass --shards "
                        f"NEW_FOLDER) and the demo builds the current set")


def pipeline(out: Path, shards: Path, preset: Preset | None = None, sd_path: Path | None = None,
         seeds: int | None = None) -> list[Step]:
    """The demo's stages in order, as ``preset`` sizes them (default: `DEFAULT`). With ``sd_path``
    (real Stable Diffusion weights) the data-free D4IR student joins. ``seeds`` (default: the
    preset's): each student trains that many times, with seeds 0, 1, ...; the teacher, its cache,
    the VQ, the dreamed set and the pruned teacher are made once."""
    preset = preset or DEFAULT
    overrides, synth_args, seeds = preset.overrides, preset.synth_args, seeds or preset.seeds
    zero, ddp, nproc = _launcher()
    stages = [Step("shards", ["weatherkd", "shards", "synth", "--out", str(shards), *map(str, synth_args)],
                    shards / "manifest.json")]

    def train(name: str, stage: str, config: str, launch_config: str, *extra: str, seed: int = 0) -> Step:
        bf16 = ["train.mixed_precision=bf16"] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else []
        seed_args = [f"seed={seed}"] if seed else []
        args = [f"out_dir={out / seeded(name, seed)}", f"data.train_shards={shards}", *bf16, *extra, *seed_args,
                *overrides.get(name, [])]
        argv = _accelerate(launch_config, nproc, stage, "--config", config, *args)
        return Step(seeded(name, seed), argv, out / seeded(name, seed) / "metrics.json",
                     _max_steps(stage, config, args), out / seeded(name, seed) / PROGRESS_FILE)

    teacher, taught = out / "teacher" / "model", out / "taught-shards"
    stages.append(train("teacher", "teacher", "configs/teacher/demo.yaml", zero))
    # The teacher's outputs, once, at full resolution: kd and dckd then never run the teacher.
    stages.append(Step("cache-teacher", _accelerate(ddp, nproc, "cache-teacher", "--config", "configs/cache-teacher/demo.yaml",
                                             f"out_dir={taught}", f"teacher={teacher}", f"shards={shards}",
                                             *overrides.get("cache-teacher", [])), taught / "manifest.json"))
    stages.append(train("vq", "vq", "configs/vq/demo.yaml", ddp))
    for row, objective in preset.students.items():
        data = [] if row == "scratch" else [f"data.train_shards={taught}", f"data.eval_shards={shards}"]
        for seed in range(seeds):
            stages.append(train(f"distill-{row}", "distill", "configs/distill/demo.yaml", ddp, *objective,
                                f"teacher={teacher}", f"vq={out / 'vq' / 'model'}", *data, seed=seed))
    students = [seeded(f"distill-{row}", s) for row in preset.students for s in range(seeds)]
    stages += data_free_steps(out, shards, ddp, nproc, train, overrides, seeds)
    students += [*(seeded("distill-dream", s) for s in range(seeds)), "prune",
                 *(seeded("distill-pruned", s) for s in range(seeds))]
    if sd_path is not None:
        stages += d4ir_steps(out, shards, sd_path, ddp, nproc, train, overrides)
        students.append("distill-d4ir")
    evaluated = ("teacher", *students)  # one launch for all: one process start-up, not one per model
    # The same models on other photos, degraded by a generator the training set never saw.
    heldout = heldout_set(shards)
    stages.append(Step("heldout", ["weatherkd", "shards", "heldout", "--out", str(heldout),
                                    *overrides.get("heldout", [])], heldout / "manifest.json"))
    for name, data in (("eval", shards), ("eval-heldout", heldout)):
        argv = _accelerate(ddp, nproc, "eval", "--model", *(out / m / "model" for m in evaluated),
                           "--shards", data, "--out", out / name, *overrides.get("eval", []))
        stages.append(Step(name, argv, tuple(out / name / m / "metrics.json" for m in evaluated)))
    return stages


def heldout_set(shards: Path) -> Path:
    return shards.parent / f"{shards.name}-heldout"


def data_free_steps(out: Path, shards: Path, ddp: str, nproc: int, train, overrides, seeds: int = 1) -> list[Step]:
    """Dreaming to Prune: dream inputs from the teacher alone, distil a student on them, and prune the
    teacher (calibrated on the dreamed inputs) and distil it back on them. No training image is read."""
    dreamed, teacher = out / "dream-shards", out / "teacher" / "model"
    dream_args = [f"out_dir={dreamed}", f"teacher={teacher}", *overrides.get("dream", [])]
    prune_args = [f"out_dir={out / 'prune'}", f"network={teacher}", f"calib_shards={dreamed}", *overrides.get("prune", [])]
    return [
        Step("dream", _accelerate(ddp, nproc, "dream", "--config", "configs/dream/demo.yaml", *dream_args),
              dreamed / "manifest.json"),
        *(train("distill-dream", "distill", "configs/distill/demo-dream.yaml", ddp, f"data.train_shards={dreamed}",
                f"data.eval_shards={shards}", f"teacher={teacher}", seed=s) for s in range(seeds)),
        Step("prune", _accelerate(ddp, nproc, "prune", "--config", "configs/prune/demo.yaml", *prune_args),
              out / "prune" / "prune.json"),
        *(train("distill-pruned", "distill", "configs/distill/demo-pruned.yaml", ddp, f"data.train_shards={dreamed}",
                f"data.eval_shards={shards}", f"teacher={teacher}", f"init={out / 'prune' / 'model'}", seed=s)
          for s in range(seeds)),
    ]


def d4ir_steps(out: Path, shards: Path, sd_path: Path, ddp: str, nproc: int, train, overrides) -> list[Step]:
    """Adapter on the degraded inputs, SD synthesis from the clean targets, KD on the synthesised tars
    only (the student never sees a training pair)."""
    unet_config = sd_path / "unet" / "config.json"
    if not unet_config.is_file():
        raise UserError(f"--sd-path {sd_path}: no unet/config.json; give a local diffusers Stable Diffusion folder")
    width = json.loads(unet_config.read_text())["cross_attention_dim"]
    synth_out = out / "d4ir-shards"
    synth_args = [f"out_dir={synth_out}", f"sd_path={sd_path}", f"adapter={out / 'adapter' / 'model'}",
                  f"clean={shards}", f"teacher={out / 'teacher' / 'model'}", *overrides.get("synth", [])]
    return [
        train("adapter", "adapter", "configs/adapter/demo.yaml", ddp, f"prompt.width={width}"),
        Step("synth", _accelerate(ddp, nproc, "synth", "--config", "configs/synth/demo.yaml", *synth_args),
              synth_out / "manifest.json"),
        train("distill-d4ir", "distill", "configs/distill/demo.yaml", ddp, "objective=kd",
              f"data.train_shards={synth_out}",
              f"data.eval_shards={shards}", f"teacher={out / 'teacher' / 'model'}"),
    ]


@dataclasses.dataclass(frozen=True)
class Preset:
    """What one demo trains, and for how long. ``overrides``: config overrides per stage name
    (unseeded, e.g. ``distill-kd``), after the stage's demo config; ``diffs``: the paired
    differences the report shows besides every row against identity."""

    name: str
    out: str
    shards: str
    students: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: dict(STUDENTS))
    seeds: int = 1
    overrides: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    synth_args: tuple = ()
    diffs: tuple[tuple[str, str], ...] = (("distill-kd", "distill-scratch"), ("distill-dckd", "distill-kd"),
                                          ("distill-dckd", "distill-scratch"))


DEFAULT = Preset("default", "runs/demo", "shards/demo")

# The same stages and launches on a tiny set for a few steps: checks an install in minutes. Its
# own paths: a quick set must never stand in for the real one.
_QUICK_TRAIN = ["train.max_steps=4", "train.eval_every=2", "train.log_every=1", "ckpt.every=2", "data.crop=32",
                "train.warmup_steps=1", "tracker.kind=none", "data.num_workers=0"]  # 4 steps need no loader workers
QUICK = Preset(
    "quick", "runs/demo-quick", "shards/demo-quick",
    synth_args=("--train", 16, "--test", 1, "--size", 48, "--test-size", 64),
    overrides={"teacher": [*_QUICK_TRAIN, "loss.srd_start=2", "stats.batches=2"], "vq": _QUICK_TRAIN,
               "adapter": _QUICK_TRAIN, "distill-d4ir": _QUICK_TRAIN,
               "synth": ["size=32", "steps=4", "max_images=8", "shard_size=8"],
               "dream": ["samples=16", "size=32", "batch_size=4", "shard_size=4", "iterations=3"],
               "prune": ["calib_samples=4", "calib_size=32", "flops_size=64"],
               "distill-dream": _QUICK_TRAIN, "distill-pruned": _QUICK_TRAIN, "eval": ["--tracker", "none"],
               "heldout": ["--views", "1", "--size", "64", "--levels", "mild"],
               **{f"distill-{row}": _QUICK_TRAIN for row in STUDENTS}},
)

# DCKD against KD at a scale that can settle it: a longer-trained teacher, longer students, three
# seeds each, and the official recipe's consistency term (cri_lcr) with and without DCKD's terms.
# On the demo's photos (its shard set is shared). Resumable like the demo: rerun to continue.
# The teacher also gets larger crops and a lighter keep loss: at 500 steps, crop 96 against 64
# gained 0.8 dB and w_keep 0 against 0.3 gained 0.9 dB, while an L1 pixel loss lost 1.0 dB
# (docs/results/2026-12-07-teacher-probes.md).
_EVIDENCE_TEACHER = ["train.max_steps=3000", "train.eval_every=1000", "ckpt.every=500", "data.crop=96",
                     "loss.w_keep=0.1"]
_EVIDENCE_STUDENT = ["train.max_steps=1500", "train.eval_every=500", "ckpt.every=500"]
_EVIDENCE_STUDENTS = {**STUDENTS,
                      "kd-cons": ("objective=kd", "consistency.objectives=[kd]"),
                      "dckd-cons": ("objective=dckd", "consistency.objectives=[dckd]")}
EVIDENCE = Preset(
    "evidence", "runs/demo-evidence", "shards/demo", students=_EVIDENCE_STUDENTS, seeds=3,
    overrides={"teacher": _EVIDENCE_TEACHER, "distill-dream": _EVIDENCE_STUDENT, "distill-pruned": _EVIDENCE_STUDENT,
               **{f"distill-{row}": _EVIDENCE_STUDENT for row in _EVIDENCE_STUDENTS}},
    diffs=(*DEFAULT.diffs, ("distill-kd-cons", "distill-kd"), ("distill-dckd-cons", "distill-kd"),
           ("distill-dckd-cons", "distill-dckd")),
)
PRESETS = {p.name: p for p in (DEFAULT, QUICK, EVIDENCE)}
