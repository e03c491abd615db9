"""`weatherkd demo`: the whole pipeline on the embedded default set, each stage a real launch.

    shards synth -> teacher (ZeRO-2) -> teach (its outputs, once) -> vq (DDP)
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
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from weatherkd import report, tracking
from weatherkd.engine.loop import PROGRESS_FILE
from weatherkd.errors import UserError
from weatherkd.io import atomic_write_json, atomic_write_text
from weatherkd.logs import progress

ROOT = Path(__file__).resolve().parents[1]  # the checkout: launch/ and configs/ live here
# Student rows: name -> the objective's overrides of configs/distill/demo.yaml. Every row but
# scratch learns from the teacher's cached outputs (`teach`).
STUDENTS = {"scratch": ("objective=scratch",), "kd": ("objective=kd",), "dckd": ("objective=dckd",)}
_SHOW = re.compile(r"validation at step|resumed from|preempted")
_RUN_HEADER = re.compile(r"^# \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ", re.M)
# What a failed rank says before torchrun's summary buries it: our one-line errors, Python's and
# C++'s last words (an abort at exit prints no traceback, only these).
_CAUSE = re.compile(r"^(\[rank \d+\] )?error: |Error\b|terminate called|Fatal Python error|what\(\):|Segmentation fault")


@dataclasses.dataclass
class Stage:
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


def plan(out: Path, shards: Path, preset: Preset | None = None, sd_path: Path | None = None,
         seeds: int | None = None) -> list[Stage]:
    """The demo's stages in order, as ``preset`` sizes them (default: `DEFAULT`). With ``sd_path``
    (real Stable Diffusion weights) the data-free D4IR student joins. ``seeds`` (default: the
    preset's): each student trains that many times, with seeds 0, 1, ...; the teacher, its cache,
    the VQ, the dreamed set and the pruned teacher are made once."""
    preset = preset or DEFAULT
    overrides, synth_args, seeds = preset.overrides, preset.synth_args, seeds or preset.seeds
    zero, ddp, nproc = _launcher()
    stages = [Stage("shards", ["weatherkd", "shards", "synth", "--out", str(shards), *map(str, synth_args)],
                    shards / "manifest.json")]

    def train(name: str, stage: str, config: str, launch_config: str, *extra: str, seed: int = 0) -> Stage:
        bf16 = ["train.mixed_precision=bf16"] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else []
        seed_args = [f"seed={seed}"] if seed else []
        args = [f"out_dir={out / seeded(name, seed)}", f"data.train_shards={shards}", *bf16, *extra, *seed_args,
                *overrides.get(name, [])]
        argv = _accelerate(launch_config, nproc, stage, "--config", config, *args)
        return Stage(seeded(name, seed), argv, out / seeded(name, seed) / "metrics.json",
                     _max_steps(stage, config, args), out / seeded(name, seed) / PROGRESS_FILE)

    teacher, taught = out / "teacher" / "model", out / "taught-shards"
    stages.append(train("teacher", "teacher", "configs/teacher/demo.yaml", zero))
    # The teacher's outputs, once, at full resolution: kd and dckd then never run the teacher.
    stages.append(Stage("teach", _accelerate(ddp, nproc, "teach", "--config", "configs/teach/demo.yaml",
                                             f"out_dir={taught}", f"teacher={teacher}", f"shards={shards}",
                                             *overrides.get("teach", [])), taught / "manifest.json"))
    stages.append(train("vq", "vq", "configs/vq/demo.yaml", ddp))
    for row, objective in preset.students.items():
        data = [] if row == "scratch" else [f"data.train_shards={taught}", f"data.eval_shards={shards}"]
        for seed in range(seeds):
            stages.append(train(f"distill-{row}", "distill", "configs/distill/demo.yaml", ddp, *objective,
                                f"teacher={teacher}", f"vq={out / 'vq' / 'model'}", *data, seed=seed))
    students = [seeded(f"distill-{row}", s) for row in preset.students for s in range(seeds)]
    stages += data_free_stages(out, shards, ddp, nproc, train, overrides, seeds)
    students += [*(seeded("distill-dream", s) for s in range(seeds)), "prune",
                 *(seeded("distill-pruned", s) for s in range(seeds))]
    if sd_path is not None:
        stages += d4ir_stages(out, shards, sd_path, ddp, nproc, train, overrides)
        students.append("distill-d4ir")
    evaluated = ("teacher", *students)  # one launch for all: one process start-up, not one per model
    # The same models on other photos, degraded by a generator the training set never saw.
    heldout = heldout_set(shards)
    stages.append(Stage("heldout", ["weatherkd", "shards", "heldout", "--out", str(heldout),
                                    *overrides.get("heldout", [])], heldout / "manifest.json"))
    for name, data in (("eval", shards), ("eval-heldout", heldout)):
        argv = _accelerate(ddp, nproc, "eval", "--model", *(out / m / "model" for m in evaluated),
                           "--shards", data, "--out", out / name, *overrides.get("eval", []))
        stages.append(Stage(name, argv, tuple(out / name / m / "metrics.json" for m in evaluated)))
    return stages


def heldout_set(shards: Path) -> Path:
    return shards.parent / f"{shards.name}-heldout"


def data_free_stages(out: Path, shards: Path, ddp: str, nproc: int, train, overrides, seeds: int = 1) -> list[Stage]:
    """Dreaming to Prune: dream inputs from the teacher alone, distil a student on them, and prune the
    teacher (calibrated on the dreamed inputs) and distil it back on them. No training image is read."""
    dreamed, teacher = out / "dream-shards", out / "teacher" / "model"
    dream_args = [f"out_dir={dreamed}", f"teacher={teacher}", *overrides.get("dream", [])]
    prune_args = [f"out_dir={out / 'prune'}", f"network={teacher}", f"calib_shards={dreamed}", *overrides.get("prune", [])]
    return [
        Stage("dream", _accelerate(ddp, nproc, "dream", "--config", "configs/dream/demo.yaml", *dream_args),
              dreamed / "manifest.json"),
        *(train("distill-dream", "distill", "configs/distill/demo-dream.yaml", ddp, f"data.train_shards={dreamed}",
                f"data.eval_shards={shards}", f"teacher={teacher}", seed=s) for s in range(seeds)),
        Stage("prune", _accelerate(ddp, nproc, "prune", "--config", "configs/prune/demo.yaml", *prune_args),
              out / "prune" / "prune.json"),
        *(train("distill-pruned", "distill", "configs/distill/demo-pruned.yaml", ddp, f"data.train_shards={dreamed}",
                f"data.eval_shards={shards}", f"teacher={teacher}", f"init={out / 'prune' / 'model'}", seed=s)
          for s in range(seeds)),
    ]


def d4ir_stages(out: Path, shards: Path, sd_path: Path, ddp: str, nproc: int, train, overrides) -> list[Stage]:
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
        Stage("synth", _accelerate(ddp, nproc, "synth", "--config", "configs/synth/demo.yaml", *synth_args),
              synth_out / "manifest.json"),
        train("distill-d4ir", "distill", "configs/distill/demo.yaml", ddp, "objective=kd",
              f"data.train_shards={synth_out}",
              f"data.eval_shards={shards}", f"teacher={out / 'teacher' / 'model'}"),
    ]


def _display(argv: list[str]) -> str:
    """The command with paths under the current directory written relative to it."""
    cwd = Path.cwd()

    def short(a: str) -> str:
        key, sep, value = a.rpartition("=") if "=" in a and not a.startswith("-") else ("", "", a)
        p = Path(value)
        if p.is_absolute() and p.is_relative_to(cwd):
            value = str(p.relative_to(cwd))
        return f"{key}{sep}{value}"

    return shlex.join(short(a) for a in argv)


def _executable(argv: list[str]) -> list[str]:
    """Run the printed command with this interpreter, whatever is first on PATH."""
    if argv[:2] == ["accelerate", "launch"]:
        return [sys.executable, "-m", "accelerate.commands.launch", *argv[2:]]
    return [sys.executable, "-m", *argv]


def _follow(bar, record: Path | None) -> None:
    """Move the bar to the step in the engine's progress record (absent until the first log step)."""
    try:
        step = json.loads(record.read_text())["step"]
    except (OSError, ValueError, KeyError, AttributeError):
        return
    if step > bar.n:
        bar.update(step - bar.n)


def failure_lines(log: str, causes: int = 8, tail: int = 15) -> list[str]:
    """The lines to show for a failed stage: the first lines of its last run that name a cause,
    then the run's last lines (with a launch, torchrun's summary of which rank died how)."""
    runs = _RUN_HEADER.split(log)
    run = runs[-1].splitlines()[1 if len(runs) > 1 else 0:]  # below the last header run_stage wrote
    last = run[-tail:]
    named = [ln for ln in run[:len(run) - len(last)] if _CAUSE.search(ln) and "traceback :" not in ln][:causes]
    return named + (["..."] if named else []) + last


def run_stage(stage: Stage, log_path: Path, env: dict) -> None:
    """Run one stage with its output in ``log_path``; show its progress and key lines."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    bar = progress(total=stage.steps, desc=stage.name, unit="step") if stage.steps else None
    with open(log_path, "a", buffering=1) as log:  # line-buffered: `tail -f` follows a stage live
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}  {shlex.join(stage.argv)}\n")
        log.flush()
        proc = subprocess.Popen(_executable(stage.argv), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)
        try:
            for line in proc.stdout:
                log.write(line)
                if bar is not None:
                    _follow(bar, stage.progress)
                if _SHOW.search(line) and "Traceback" not in line:
                    (bar.write if bar is not None else print)(f"  {line.rstrip()[-160:]}")
            rc = proc.wait()
            if bar is not None:
                _follow(bar, stage.progress)
        except BaseException:  # Ctrl-C: stop the whole stage, then let the interrupt through
            proc.terminate()
            proc.wait()
            raise
        finally:
            if bar is not None:
                bar.close()
    if rc != 0:
        print("\n".join(f"  | {ln}" for ln in failure_lines(log_path.read_text())), file=sys.stderr)
        raise UserError(f"demo stage '{stage.name}' failed (exit {rc}); its full log: {log_path}")


def _pipeline_id(out: Path) -> str:
    """This demo's W&B group, kept in ``out/pipeline_id`` so a rerun joins the same group."""
    path = out / "pipeline_id"
    if not path.is_file():
        atomic_write_text(path, f"demo-{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return path.read_text().strip()


def run(preset: Preset | None = None, out=None, shards=None, sd_path=None, seeds: int | None = None) -> dict:
    preset = preset or DEFAULT
    if not (ROOT / "launch").is_dir() or not (ROOT / "configs").is_dir():
        raise UserError(f"weatherkd demo runs from a source checkout (launch/ and configs/ next to the package); "
                        f"{ROOT} has none. Install with `pip install -e .` from the repository.")
    out, shards = Path(out or preset.out).resolve(), Path(shards or preset.shards).resolve()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[tracking.PIPELINE_ENV] = env.get(tracking.PIPELINE_ENV) or _pipeline_id(out)  # one W&B group
    sd_path = Path(sd_path).resolve() if sd_path else None
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds must be at least 1 (got {seeds})")
    stages = plan(out, shards, preset, sd_path, seeds)
    start = time.time()
    timings = out / "logs" / "seconds.json"  # per stage, kept across reruns (docs/demo.md)
    seconds = json.loads(timings.read_text()) if timings.is_file() else {}
    for i, stage in enumerate(stages, 1):
        head = f"[{i}/{len(stages) + 1}] {stage.name}"
        if stage.finished():
            print(f"{head}: done already ({_display([stage.shown()])}), skipped")
            continue
        print(f"{head}: {_display(stage.argv)}", flush=True)
        t0 = time.time()
        run_stage(stage, out / "logs" / f"{stage.name}.log", env)
        seconds[stage.name] = round(time.time() - t0, 1)
        atomic_write_json(timings, seconds)
        print(f"{head}: finished in {seconds[stage.name]:.0f} s", flush=True)
    print(f"[{len(stages) + 1}/{len(stages) + 1}] report", flush=True)
    evals = {s.name: [done.parent for done in s.done] for s in stages if s.name.startswith("eval")}
    table = report.gather(evals["eval"], diffs=list(preset.diffs))
    heldout = report.gather(evals["eval-heldout"])
    table["targets"], table["notes"] = data_free_targets(table)
    quality, quality_notes = quality_targets(table, heldout)
    table["targets"].update(quality)
    table["notes"] += quality_notes
    table["checklist"] = checklist(table, heldout)
    table["notes"].append("Targets: " + "; ".join(f"{c['target']}: {c['figure']} ({'met' if c['met'] else 'FAILS'})"
                                                 for c in table["checklist"]) + ".")
    table["heldout"] = heldout
    if sd_path is None:
        table["notes"].append("No D4IR row: it needs real Stable Diffusion weights, and a random diffusion model "
                              "makes images with no weather in them. Rerun with --sd-path DIR (a local diffusers "
                              "folder) to add it.")
    table["heldout_title"] = "Held-out check: other photos, another weather generator"
    table["heldout_about"] = (f"`{_display([str(heldout_set(shards))])}` (`weatherkd shards heldout`: scikit-image's "
                              f"greyscale photos and shipped colour photos that training never saw, weather drawn by "
                              f"`weatherkd/data/heldout.py`, mild and moderate).")
    text = report.document(table)
    figures = report.write(table, text, out / "report.md")
    if "none" not in preset.overrides.get("eval", []):  # the quick demo tracks nothing
        report.track(table, out, figures)
    print(f"\n{text}\nreport: {_display([str(out / 'report.md')])} (+ .json, .html); total {time.time() - start:.0f} s")
    return table


def data_free_targets(table: dict) -> tuple[dict, list[str]]:
    """The data-free rows against their targets: the dreamed student's share of kd's gain over
    identity (target 50%), and the pruned teacher's FLOPs cut (target 40%) and PSNR drop."""
    rows = {r["name"]: r for r in table["rows"]}
    psnr = {name: r["mean"]["psnr"] for name, r in rows.items()}
    targets, notes = {}, []
    if {"distill-kd", "distill-dream"} <= psnr.keys():
        kd_gain, dream_gain = psnr["distill-kd"] - psnr["identity"], psnr["distill-dream"] - psnr["identity"]
        share = dream_gain / kd_gain if kd_gain > 0 else float("nan")
        targets["dream_share_of_kd_gain"] = share
        notes.append(f"distill-dream (data-free: dreamed inputs only, never a training image): {dream_gain:+.2f} dB "
                     f"over identity, {share:.0%} of distill-kd's {kd_gain:+.2f} dB (target: at least 50%).")
    if {"teacher", "prune", "distill-pruned"} <= psnr.keys():
        cut = 1 - rows["distill-pruned"]["cost"]["gflops"] / rows["teacher"]["cost"]["gflops"]
        drop, raw = psnr["teacher"] - psnr["distill-pruned"], psnr["teacher"] - psnr["prune"]
        targets.update(pruned_flops_cut=cut, pruned_psnr_drop=drop, pruned_psnr_drop_before_distill=raw)
        notes.append(f"distill-pruned: the teacher pruned by {cut:.0%} of its FLOPs (target: at least 40%), then "
                     f"distilled on the dreamed inputs: {drop:.2f} dB below the teacher (prune, before "
                     f"distillation: {raw:.2f} dB below).")
    return targets, notes


def checklist(table: dict, heldout: dict) -> list[dict]:
    """Every target the demo is held to, each with its figure and whether it is met: what a
    distillation system must show on its own embedded data (a teacher worth distilling, KD that
    helps beyond the spread, data-free students that recover most of it, models safe off their
    generator). A target whose rows are missing is not listed."""
    rows = {r["name"]: r for r in table["rows"]}
    psnr = {name: r["mean"]["psnr"] for name, r in rows.items()}
    diff = {(d["a"], d["b"]): d for d in table["differences"]}
    held = {d["a"]: d for d in heldout.get("differences", []) if d["b"] == "identity"}
    out = []

    def add(target: str, figure: str, met: bool) -> None:
        out.append({"target": target, "figure": figure, "met": bool(met)})

    if ("teacher", "identity") in diff:
        d = diff[("teacher", "identity")]
        worst = min(x["mean"] for x in d["weathers"].values())
        add("teacher beats identity by >= 1.5 dB mean and on every weather",
            f"{d['mean']:+.2f} dB mean, worst weather {worst:+.2f}", d["mean"] >= 1.5 and worst > 0)
    if {"teacher", "distill-scratch"} <= psnr.keys():
        gap = psnr["teacher"] - psnr["distill-scratch"]
        add("teacher beats the scratch student", f"{gap:+.2f} dB", gap > 0)
    if ("distill-kd", "distill-scratch") in diff:
        d = diff[("distill-kd", "distill-scratch")]
        se, sd = d.get("se") or 0.0, (d.get("per_seed") or {}).get("std", 0.0)
        add("kd - scratch > 2 SE over images and > 2 SD over seeds",
            f"{d['mean']:+.2f} dB, SE {se:.2f}, seed SD {sd:.2f}", d["mean"] > 2 * se and d["mean"] > 2 * sd)
    share = table.get("targets", {}).get("dream_share_of_kd_gain")
    if share is not None:
        add("dreamed student recovers >= 50% of kd's gain", f"{share:.0%}", share >= 0.5)
    t = table.get("targets", {})
    if "pruned_flops_cut" in t:
        add("pruned teacher: >= 40% fewer FLOPs, <= 0.5 dB below the teacher after distillation",
            f"{t['pruned_flops_cut']:.0%} fewer, {t['pruned_psnr_drop']:.2f} dB below",
            t["pruned_flops_cut"] >= 0.4 and t["pruned_psnr_drop"] <= 0.5)
    if "teacher" in held:
        add("held-out: teacher beats identity by >= 0.5 dB mean", f"{held['teacher']['mean']:+.2f} dB",
            held["teacher"]["mean"] >= 0.5)
    if held:
        worst = {n: min(x["mean"] for x in d["weathers"].values()) for n, d in held.items()}
        name = min(worst, key=worst.get)
        add(f"held-out: no model more than {HELDOUT_LOSS_BAR} dB below identity on any weather",
            f"worst {name} {worst[name]:+.2f} dB", worst[name] >= -HELDOUT_LOSS_BAR)
    clean_in = {r["name"]: r["clean_in"]["psnr"] for r in table["rows"] if "clean_in" in r}
    if clean_in:
        name = min(clean_in, key=clean_in.get)
        add(f"clean-in PSNR >= {CLEAN_IN_BAR:.0f} dB for every model", f"lowest {name} {clean_in[name]:.1f} dB",
            clean_in[name] >= CLEAN_IN_BAR)
    return out


CLEAN_IN_BAR = 35.0  # dB: a clean photo comes back nearly unchanged
HELDOUT_LOSS_BAR = 0.5  # dB: on the held-out check, no weather may lose more than this to identity


def quality_targets(table: dict, heldout: dict) -> tuple[dict, list[str]]:
    """The bars a restoration model must clear to be safe on a user's photos: the teacher beats
    identity on every weather; no model returns a clean photo below 35 dB; and on the held-out
    check no model loses more than 0.5 dB to identity on any weather."""
    vs_identity = {d["a"]: d for d in table["differences"] if d["b"] == "identity"}
    teacher = vs_identity.get("teacher", {}).get("weathers", {})
    teacher_worse = sorted(w for w, d in teacher.items() if d["mean"] <= 0)
    clean_in = {r["name"]: r["clean_in"]["psnr"] for r in table["rows"] if "clean_in" in r}  # seeded: the mean
    below = {name: v for name, v in clean_in.items() if v < CLEAN_IN_BAR}
    held = {d["a"]: min(x["mean"] for x in d["weathers"].values()) for d in heldout["differences"] if d["b"] == "identity"}
    losers = {name: v for name, v in held.items() if v < -HELDOUT_LOSS_BAR}
    targets = {"teacher_weathers_worse_than_identity": teacher_worse, "clean_in_below_bar": below,
               "heldout_worst_weather_vs_identity": held}
    notes = [
        "teacher against identity, per weather: " + (", ".join(f"{w} {d['mean']:+.2f} dB" for w, d in teacher.items())
                                                    or "not scored image by image")
        + (f" (worse on {', '.join(teacher_worse)})" if teacher_worse else " (better on every weather)") + ".",
        f"clean-in PSNR under the {CLEAN_IN_BAR:.0f} dB bar: "
        + (", ".join(f"{n} {v:.2f}" for n, v in below.items()) if below else "none") + ".",
        f"held-out check, each model's worst weather against identity (bar: -{HELDOUT_LOSS_BAR} dB): "
        + ", ".join(f"{n} {v:+.2f}" + (" (FAILS)" if n in losers else "") for n, v in held.items()) + ".",
    ]
    return targets, notes


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


def run_cli(args) -> int:
    preset = PRESETS["quick" if args.quick else args.preset]
    try:
        run(preset, args.out, args.shards, args.sd_path, args.seeds)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue where it stopped", file=sys.stderr)
        return 130
    return 0
