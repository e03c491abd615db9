"""`weatherkd demo`: run the pipeline's steps in order, each a real launch with its output in
``OUT/logs/<step>.log``, then the report. A step whose outputs exist is skipped, and a half-done
training step resumes from its last checkpoint, so rerunning an interrupted demo continues it."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from weatherkd import tracking
from weatherkd.commands import report
from weatherkd.commands.demo.pipeline import (DEFAULT, PRESETS, ROOT, Preset, Step, check_shard_set, heldout_set,
                                              pipeline)
from weatherkd.commands.report import targets
from weatherkd.errors import UserError
from weatherkd.io import atomic_write_json, atomic_write_text
from weatherkd.logs import progress

_SHOW = re.compile(r"validation at step|resumed from|preempted")
_RUN_HEADER = re.compile(r"^# \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ", re.M)
# What a failed rank says before torchrun's summary buries it: our one-line errors, Python's and
# C++'s last words (an abort at exit prints no traceback, only these).
_CAUSE = re.compile(r"^(\[rank \d+\] )?error: |Error\b|terminate called|Fatal Python error|what\(\):|Segmentation fault")


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


def run_step(stage: Step, log_path: Path, env: dict) -> None:
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
    check_shard_set(shards)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[tracking.PIPELINE_ENV] = env.get(tracking.PIPELINE_ENV) or _pipeline_id(out)  # one W&B group
    sd_path = Path(sd_path).resolve() if sd_path else None
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds must be at least 1 (got {seeds})")
    stages = pipeline(out, shards, preset, sd_path, seeds)
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
        run_step(stage, out / "logs" / f"{stage.name}.log", env)
        seconds[stage.name] = round(time.time() - t0, 1)
        atomic_write_json(timings, seconds)
        print(f"{head}: finished in {seconds[stage.name]:.0f} s", flush=True)
    print(f"[{len(stages) + 1}/{len(stages) + 1}] report", flush=True)
    evals = {s.name: [done.parent for done in s.done] for s in stages if s.name.startswith("eval")}
    table = report.gather(evals["eval"], diffs=list(preset.diffs))
    heldout = report.gather(evals["eval-heldout"])
    targets.assess(table, heldout)
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


def run_cli(args) -> int:
    preset = PRESETS["quick" if args.quick else args.preset]
    try:
        run(preset, args.out, args.shards, args.sd_path, args.seeds)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue where it stopped", file=sys.stderr)
        return 130
    return 0
