"""The fault-injection tier (`pytest -m faults`): real processes, real files, no mocks.

Hard kills at chosen moments (``WEATHERKD_FAILPOINT`` SIGKILLs the launcher and every rank at
once), corrupt and hostile checkpoints, two runs on one folder, unreadable images, malformed YAML.
"""

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import (FP16_REFUSAL, REPO, accelerate_launch, assert_one_line_refusal, cli_env, free_port, refused,
                      refuses_fp16, run_cli)

from weatherkd.engine import checkpoint
from weatherkd.engine.run_lock import LOCK_FILE
from weatherkd.io import sha256_file

pytestmark = pytest.mark.faults
CONFIG = "configs/teacher/test.yaml"
RUN = ["train.max_steps=8", "ckpt.every=2", "ckpt.keep=2", "train.ema_decay=0.9", "train.eval_every=0",
       "train.log_every=1"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "shards"
    run_cli("shards", "synth", "--out", out, "--train", 8, "--test", 1, "--size", 32, "--test-size", 48)
    return out


def teacher(out: Path, shards: Path, *overrides, failpoint: str | None = None, launch: str = "cpu-ddp",
            check: bool = True):
    env = cli_env(**({"WEATHERKD_FAILPOINT": failpoint} if failpoint else {}))
    return accelerate_launch(["weatherkd", "teacher", "--config", CONFIG, f"out_dir={out}",
                              f"data.train_shards={shards}", *overrides], config=f"launch/{launch}.yaml",
                             module=True, env=env, check=check)


def steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


def assert_same_weights(a: Path, b: Path):
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_hard_kills_at_any_moment_then_a_corrupt_latest_resume_bit_exact(tiny_set, tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "killed"
    teacher(straight, tiny_set, *RUN)

    # 1. Killed while writing the step-4 checkpoint: every rank's state is on disk, no manifest yet.
    killed = teacher(run, tiny_set, *RUN, failpoint="checkpoint.state_written:4", check=False)
    assert killed.returncode != 0
    assert steps(run) == ["step-0000002"] and list((run / "checkpoints").glob(".step-0000004.tmp"))
    assert (run / LOCK_FILE).is_file()  # a SIGKILLed run leaves its lock behind

    # 2. Resumed from step 2 (taking over the dead run's lock); killed after the step-6 checkpoint
    #    got its name but before `latest` moved.
    killed = teacher(run, tiny_set, *RUN, failpoint="checkpoint.renamed:6", check=False)
    assert killed.returncode != 0 and "is no longer running" in killed.stderr, killed.stderr[-3000:]
    assert "resumed from" in killed.stderr and "step-0000002" in killed.stderr
    assert steps(run) == ["step-0000002", "step-0000004", "step-0000006"]  # killed before rotation, too
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000004"

    # 3. Resumed from step 6 (the newest that verifies, whatever `latest` says); killed mid-training.
    killed = teacher(run, tiny_set, *RUN, failpoint="train.step:7", check=False)
    assert killed.returncode != 0 and "step-0000006 at step 6" in killed.stderr, killed.stderr[-3000:]

    # 4. The latest checkpoint is truncated: resume names it, falls back to step 4, and finishes.
    weights = run / "checkpoints" / "step-0000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    done = teacher(run, tiny_set, *RUN)
    assert "step-0000006 does not verify" in done.stderr and "model.safetensors is 100 bytes" in done.stderr
    assert "step-0000004 at step 4" in done.stderr
    assert_same_weights(straight, run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ranks_in_sync"] and metrics["world_size"] == 2 and metrics["parallelism"] == "multi_cpu"
    assert metrics["step"] == 8 and metrics["n"] == 3 and metrics["protocol"] == "rgb"
    spec = json.loads((run / "model" / "model.json").read_text())
    assert spec["arch"] == "residual_cnn" and spec["kwargs"] == {"width": 8, "depth": 3}
    assert not (run / "model" / "feature_stats.safetensors").exists()  # a net without norm layers: nothing to record
    assert steps(run) == ["step-0000006", "step-0000008"] and not list((run / "checkpoints").glob(".*.tmp"))
    assert not (run / LOCK_FILE).exists()  # released at the end


def test_deleted_files_fall_back_to_the_newest_checkpoint_that_verifies(tiny_set, tmp_path):
    run = tmp_path / "run"
    args = ["teacher", "--config", CONFIG, f"out_dir={run}", f"data.train_shards={tiny_set}", "ckpt.every=2"]
    run_cli(*args, "train.max_steps=4")
    root = run / "checkpoints"
    assert checkpoint.choose("auto", root) == root / "step-0000004"
    manifest = json.loads((root / "step-0000004" / checkpoint.MANIFEST).read_text())
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "engine_state.json",
            "engine_state.safetensors"} <= set(manifest["files"])
    (root / "step-0000004" / "random_states_0.pkl").unlink()
    assert checkpoint.choose("auto", root) == root / "step-0000002"
    with pytest.raises(checkpoint.CheckpointError, match="random_states_0.pkl is missing"):
        checkpoint.choose(str(root / "step-0000004"), root)  # a checkpoint asked for by name does not fall back
    (root / "step-0000002" / checkpoint.MANIFEST).unlink()
    line = one_error_line(run_cli(*args, "train.max_steps=6", check=False))
    assert line.startswith(f"error: no checkpoint under {root} verifies")
    assert "step-0000004: random_states_0.pkl is missing" in line and "step-0000002: it has no MANIFEST.json" in line


class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: Path, marker: Path, ckpt: Path):
    """A hostile but self-consistent checkpoint: the payload, and a manifest that vouches for it."""
    torch.save({"state": _Payload(marker)}, path)
    _vouch(path, ckpt)


def _vouch(path: Path, ckpt: Path):
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    rel = str(path.relative_to(ckpt))
    manifest["files"][rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_cannot_run_code_on_any_rank_under_zero(tiny_set, tmp_path):
    run = tmp_path / "zero2"
    teacher(run, tiny_set, "train.max_steps=2", "ckpt.every=2", "train.ema_decay=0.9", launch="cpu-zero2")
    ckpt = run / "checkpoints" / "step-0000002"
    assert not list(ckpt.rglob("custom_checkpoint_*"))  # the engine's own state is JSON + safetensors
    marker = tmp_path / "PWNED"
    # Rank 1's optimizer shard: only rank 1 would ever read it.
    (shard,) = ckpt.glob("pytorch_model/zero_pp_rank_1_*optim_states.pt")
    original = shard.read_bytes()
    _plant(shard, marker, ckpt)
    proc = teacher(run, tiny_set, "train.max_steps=4", "ckpt.every=2", "train.ema_decay=0.9", launch="cpu-zero2",
                   check=False)
    assert proc.returncode != 0 and not marker.exists()
    assert f"error: {shard} holds pickled posix.system" in proc.stderr, proc.stderr[-3000:]

    # The file the original report planted (accelerate's custom state, which the engine no longer
    # writes or reads) is refused all the same; so is a raw pickle that is not a torch archive.
    shard.write_bytes(original)
    _vouch(shard, ckpt)
    _plant(ckpt / "custom_checkpoint_0.pkl", marker, ckpt)
    assert checkpoint.choose("auto", run / "checkpoints") == ckpt  # it verifies: the manifest vouches for it
    with pytest.raises(checkpoint.CheckpointError, match="custom_checkpoint_0.pkl holds pickled posix.system"):
        checkpoint.refuse_pickled_code(ckpt)
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(checkpoint.CheckpointError, match="not a torch archive"):
        checkpoint.refuse_pickled_code(ckpt)
    # And beneath the scan: torch.load inside the engine's load is weights_only, even when a library asks
    # for weights_only=False.
    _plant(shard, marker, ckpt)
    with checkpoint.weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(shard, weights_only=False)
    assert not marker.exists()

    # With the planted files gone, the same ZeRO-2 checkpoint resumes and the run finishes.
    shard.write_bytes(original)
    _vouch(shard, ckpt)
    (ckpt / "custom_checkpoint_0.pkl").unlink()
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    del manifest["files"]["custom_checkpoint_0.pkl"]
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    proc = teacher(run, tiny_set, "train.max_steps=4", "ckpt.every=2", "train.ema_decay=0.9", launch="cpu-zero2")
    assert "resumed from" in proc.stderr and "step-0000002" in proc.stderr
    assert json.loads((run / "metrics.json").read_text())["step"] == 4 and not marker.exists()


def _background(out: Path, shards: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/cpu-ddp.yaml"),
           "--main_process_port", str(free_port()), "-m", "weatherkd", "teacher", "--config", CONFIG,
           f"out_dir={out}", f"data.train_shards={shards}", "train.max_steps=100000", "train.log_every=1",
           "train.eval_every=0", "ckpt.every=100000", "ckpt.preempt_check_every=1"]
    with open(log, "w") as f:  # a file, not a pipe: an unread pipe fills and stalls the run
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=cli_env(),
                                start_new_session=True)


@pytest.mark.parametrize("launch", ["cpu-ddp", "cpu-zero2"])
def test_a_bug_on_one_rank_ends_the_launch_at_once_with_its_traceback(tiny_set, tmp_path, launch):
    """Rank 0 raises after step 2 while rank 1 goes on. Before, the raising rank never exited (the
    interpreter's teardown waited on threads), so the launcher waited too, forever."""
    proc = accelerate_launch(["weatherkd", "teacher", "--config", CONFIG, f"out_dir={tmp_path / 'run'}",
                              f"data.train_shards={tiny_set}", "data.num_workers=1", *RUN],
                             config=f"launch/{launch}.yaml", module=True, check=False, timeout=150,
                             env=cli_env(WEATHERKD_FAILPOINT="train.step:2:raise"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "RuntimeError: failpoint train.step at step 2" in proc.stderr


def test_a_second_run_on_a_busy_out_dir_stops_at_once_naming_the_holder(tiny_set, tmp_path):
    run, log = tmp_path / "busy", tmp_path / "first.log"
    first = _background(run, tiny_set, log)
    try:
        deadline = time.time() + 120
        while "step 1 " not in log.read_text():
            assert first.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] != first.pid  # rank 0, not the launcher
        config = (run / "config.yaml").read_text()
        second = teacher(run, tiny_set, "train.max_steps=2", "train.log_every=1", check=False)
        assert second.returncode != 0
        errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
        assert errors and all(f"in use by another run (PID {holder['pid']} on {holder['host']}" in e for e in errors)
        assert len(errors) == 2  # both ranks got rank 0's answer
        assert json.loads((run / LOCK_FILE).read_text()) == holder and (run / "config.yaml").read_text() == config
        assert first.poll() is None  # the holder is undisturbed
        (run / "STOP").touch()
        first.wait(timeout=120)
        assert not (run / LOCK_FILE).exists()  # a preempted run releases its lock on the way out
    finally:  # on a failure too: the stop file ends every rank (a SIGKILL to the launcher would orphan them)
        if first.poll() is None:
            (run / "STOP").touch()
            try:
                first.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(first.pid, 9)


# ---------------------------------------------------------------------------- bad input files


def _truncated_copies(folder: Path, rng) -> None:
    for name, fmt in (("bad_jpeg.jpg", "JPEG"), ("bad_png.png", "PNG")):
        path = folder / name
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path, fmt)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


def test_ingest_names_a_truncated_image_or_skips_and_counts_it(tmp_path):
    rng = np.random.default_rng(0)
    inputs, targets = tmp_path / "input", tmp_path / "gt"
    inputs.mkdir(), targets.mkdir()
    for name in ("good_a.png", "good_b.png"):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(inputs / name)
    _truncated_copies(inputs, rng)
    for p in inputs.iterdir():  # every target is fine: the inputs are what is broken
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(targets / p.name,
                                                                                 "JPEG" if p.suffix == ".jpg" else "PNG")
    args = ["shards", "ingest", "--layout", "paired", "--root", inputs, "--target-root", targets, "--weather", "snow"]
    line = one_error_line(refused(*args, "--out", tmp_path / "strict"))
    assert str(inputs / "bad_jpeg.jpg") in line and "--skip-bad" in line
    assert not (tmp_path / "strict" / "manifest.json").exists()
    run_cli(*args, "--out", tmp_path / "lenient", "--skip-bad")
    manifest = json.loads((tmp_path / "lenient" / "manifest.json").read_text())
    bad = manifest["created_by"]["skipped_bad"]
    assert len(bad) == 2 and any("bad_jpeg.jpg" in b for b in bad) and any("bad_png.png" in b for b in bad)
    assert manifest["splits"]["train"]["snow"] == 2
    assert run_cli("shards", "inspect", tmp_path / "lenient").returncode == 0


def test_synth_from_a_folder_names_or_skips_unreadable_photos(tmp_path):
    rng = np.random.default_rng(1)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photos / f"ok{i}.png")
    _truncated_copies(photos, rng)
    args = ["shards", "synth", "--source", photos, "--train", 2, "--test", 1, "--size", 32, "--test-size", 48]
    line = one_error_line(refused(*args, "--out", tmp_path / "strict"))
    assert "bad_jpeg.jpg" in line and "unreadable image" in line
    run_cli(*args, "--out", tmp_path / "lenient", "--skip-bad")
    manifest = json.loads((tmp_path / "lenient" / "manifest.json").read_text())
    assert len(manifest["created_by"]["skipped_bad"]) == 2


def test_malformed_yaml_is_one_line_on_the_command_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  max_steps: 4\n lr: 1\n")
    line = one_error_line(refused("teacher", "--config", config, "train.max_steps=2"))
    assert line.startswith(f"error: {config}:3:") and "invalid YAML" in line


# ---------------------------------------------------------------------------- non-finite training

def test_a_nan_on_one_rank_stops_every_rank_and_keeps_the_last_finite_checkpoint(tiny_set, tmp_path):
    """Rank 1's loss goes NaN at step 5 (`train.loss:5:nan`): both ranks skip that step, and the run
    stops at the next check (step 6, a checkpoint) with one line naming the step and the term, exit
    non-zero, so SLURM's afterok holds the next stage. Nothing after step 4 is written."""
    run = tmp_path / "run"
    proc = accelerate_launch(["weatherkd", "teacher", "--config", CONFIG, f"out_dir={run}",
                              f"data.train_shards={tiny_set}", *RUN, "ckpt.preempt_check_every=100"],
                             module=True, check=False, env=cli_env(WEATHERKD_FAILPOINT="train.loss:5:nan"))
    assert proc.returncode != 0  # the launcher's own report follows the ranks' lines
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], proc.stderr[-3000:]  # both ranks, the same step
    assert errors[0].startswith("error: step 5: training went non-finite (") and "loss" in errors[0], errors[0]
    assert "before checkpoint step-0000006" in errors[0]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000004"]
    assert checkpoint.verify(run / "checkpoints" / "step-0000004") is None
    assert not (run / "model").exists()


@pytest.mark.parametrize("launch,precision", [("cpu-ddp", "no"), ("cpu-zero2", "fp16")])
def test_allowed_nonfinite_steps_are_skipped_and_counted(tiny_set, tmp_path, launch, precision):
    """``train.max_nonfinite_steps=1``: the poisoned step is skipped and the run finishes with finite
    weights. Under DeepSpeed fp16 its loss scaler skips overflowing steps on its own and lowers the
    scale (those are not counted); the NaN loss counts once, whether or not the scaler also skipped it."""
    run, refused_here = tmp_path / "run", refuses_fp16(launch, precision)
    proc = accelerate_launch(["weatherkd", "teacher", "--config", CONFIG, f"out_dir={run}",
                              f"data.train_shards={tiny_set}", *RUN, "train.max_nonfinite_steps=1",
                              f"train.mixed_precision={precision}"], module=True, config=f"launch/{launch}.yaml",
                             env=cli_env(WEATHERKD_FAILPOINT="train.loss:3:nan"), check=not refused_here)
    if refused_here:  # this CPU has no fp16 kernels: the one-line refusal is what there is to test
        return assert_one_line_refusal(proc, FP16_REFUSAL)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["nonfinite_steps_skipped"] == 1 and metrics["ranks_in_sync"] and metrics["step"] == 8
    assert all(t.isfinite().all() for t in load_file(run / "model" / "model.safetensors").values())


# ---------------------------------------------------------------------------- damaged exports

def test_a_truncated_export_is_refused_by_every_command_that_loads_it(tiny_set, tmp_path):
    from weatherkd import models

    torch.manual_seed(0)
    model_dir = models.save(models.build("residual_cnn", width=8, depth=3), tmp_path / "model")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(photo)
    for args in (["restore", "--model", model_dir, photo, "--out", tmp_path / "restored"],
                 ["eval", "--model", model_dir, "--shards", tiny_set],
                 ["export", "--model", model_dir],
                 ["distill", "--config", "configs/distill/demo.yaml", f"teacher={model_dir}",
                  f"data.train_shards={tiny_set}", f"out_dir={tmp_path / 'kd'}", "objective=kd", "tracker.kind=none"]):
        proc = refused(*args)
        assert proc.returncode == 1, args
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: {model_dir}: model.safetensors is ") and "damaged" in line, (args, line)
    (model_dir / "model.json").write_text('{"arch": "residual_cnn", "kwa')  # a torn record
    proc = refused("restore", "--model", model_dir, photo, "--out", tmp_path / "restored")
    assert proc.returncode == 1 and "model.json is damaged" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "restored").exists() and not (tmp_path / "kd" / "model").exists()


# ---------------------------------------------------------------------------- resume with another config

def test_a_resume_refuses_a_changed_run_and_records_an_extended_one(tiny_set, tmp_path):
    run = tmp_path / "run"
    base = ["teacher", "--config", CONFIG, f"out_dir={run}", f"data.train_shards={tiny_set}", "ckpt.every=2",
            "train.eval_every=0"]
    run_cli(*base, "train.max_steps=2")
    for change in (["loss.w_keep=0.5"], ["train.lr=0.1"], ["seed=1"]):
        proc = run_cli(*base, "train.max_steps=4", *change, check=False)
        line = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and line.startswith("error: resume from step-0000002: the config changes"), line
        assert change[0].split("=")[0] + ":" in line and "resume_allow_changes=true" in line
    assert "max_steps: 2" in (run / "config.yaml").read_text()  # the run's record is untouched
    run_cli(*base, "train.max_steps=4", "train.log_every=1")  # more steps, another cadence: no flag needed
    run_cli(*base, "train.max_steps=6", "train.lr=0.0005", "resume_allow_changes=true")
    history = json.loads((run / "config_history.json").read_text())
    assert [h["step"] for h in history] == [2, 4]
    assert history[0]["defining"] == [] and set(history[0]["changes"]) == {"train.max_steps", "train.log_every"}
    assert history[1]["defining"] == ["train.lr"] and history[1]["changes"]["train.lr"] == {"from": 0.001, "to": 0.0005}
    assert json.loads((run / "metrics.json").read_text())["step"] == 6
