"""The engine under real 2-process launches: DDP, ZeRO-1/2/3 train, validate, checkpoint, resume and export."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, accelerate_launch, cli_env, free_port, run_cli

from weatherkd import models

CONFIG = "configs/teacher/test.yaml"


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "shards"
    run_cli("shards", "synth", "--out", out, "--train", 8, "--test", 1, "--size", 32, "--test-size", 48)
    return out


def teacher(launch: str, out: Path, shards: Path, *overrides):
    return accelerate_launch(["weatherkd", "teacher", "--config", CONFIG, f"out_dir={out}",
                              f"data.train_shards={shards}", *overrides], config=f"launch/{launch}.yaml", module=True)


def weights(run: Path) -> dict:
    return load_file(run / "model" / "model.safetensors")


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k}: max |diff| {(wa[k] - wb[k]).abs().max():.3g}"


# DDP's bit-exact resume is tested under harder conditions, hard kills at four moments, in test_faults.py.
# ZeRO-3 partitions parameters as well as optimizer state, so it is the harder resume and runs by
# default; ZeRO-2's is the same code path on less sharded state (`-m slow` runs it). A ZeRO-2 restart
# still runs by default: test_faults' hostile-checkpoint test ends by resuming its ZeRO-2 run.
@pytest.mark.parametrize("launch", [pytest.param("cpu-zero2", marks=pytest.mark.slow), "cpu-zero3"])
def test_resume_is_bit_exact_and_ranks_agree(launch, tiny_set, tmp_path):
    # A constant LR after warm-up: a cosine schedule depends on max_steps, so a 4-step run would decay
    # differently from the first half of an 8-step one. (Preemption tests cover cosine.)
    common = ["train.ema_decay=0.9", "train.schedule=constant"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    teacher(launch, straight, tiny_set, *common)
    teacher(launch, split, tiny_set, "train.max_steps=4", *common)
    half = json.loads((split / "metrics.json").read_text())
    assert half["step"] == 4 and (split / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    teacher(launch, split, tiny_set, "train.max_steps=8", *common)  # resume=auto extends the run

    for run in (straight, split):
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["ranks_in_sync"], metrics["rank_checksums"]
        assert metrics["parallelism"] == {"cpu-zero2": "deepspeed-zero2", "cpu-zero3": "deepspeed-zero3"}[launch]
        assert metrics["step"] == 8 and metrics["n"] == 3 and metrics["protocol"] == "rgb"
        assert set(metrics["weathers"]) == {"rain_haze", "raindrop", "snow"}
        assert metrics["identity"]["mean"]["psnr"] > 10
    # Bit-exact in fp32 on CPU: the resumed run replays the same data, RNG and optimizer state.
    assert_same_weights(straight, split)
    # keep=2: only the last two checkpoints survive; `latest` names the newest.
    assert sorted(p.name for p in (split / "checkpoints").glob("step-*")) == ["step-0000004", "step-0000008"]
    model = models.load(split / "model")
    assert model(torch.rand(1, 3, 20, 28)).shape == (1, 3, 20, 28)
    spec = json.loads((split / "model" / "model.json").read_text())
    assert spec["arch"] == "residual_cnn" and spec["kwargs"] == {"width": 8, "depth": 3}
    assert not (split / "model" / "feature_stats.safetensors").exists()  # a net without norm layers: nothing to record


@pytest.mark.slow  # ZeRO-1 is ZeRO-2's code path with gradients unsharded; ZeRO-2 and -3 run by default
def test_zero1_trains_and_exports(tiny_set, tmp_path):
    teacher("cpu-zero1", tmp_path / "z1", tiny_set, "train.max_steps=4")
    metrics = json.loads((tmp_path / "z1" / "metrics.json").read_text())
    assert metrics["ranks_in_sync"] and (tmp_path / "z1" / "model" / "model.safetensors").is_file()
    assert metrics["parallelism"] == "deepspeed-zero1"


def _launch_background(out: Path, shards: Path, *overrides) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/cpu-ddp.yaml"),
           "--main_process_port", str(free_port()), "-m", "weatherkd", "teacher", "--config", CONFIG,
           f"out_dir={out}", f"data.train_shards={shards}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=cli_env(), start_new_session=True)


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return lines
        assert time.time() < deadline, "".join(lines[-30:])
    raise AssertionError(f"run ended before '{needle}':\n" + "".join(lines[-40:]))


# With a loader worker: a preempted trainer must stop while its workers ignore the signal.
SLOW_STEPS = ["train.max_steps=40", "train.log_every=1", "train.eval_every=0", "ckpt.every=100", "data.num_workers=1",
              "model.kwargs={width: 32, depth: 6}", "data.crop=32", "data.batch_size=8"]


def _straight_slow(tiny_set, tmp_path: Path) -> Path:
    """The uninterrupted run a preempted one must match."""
    out = tmp_path / "straight"
    accelerate_launch(["weatherkd", "teacher", "--config", CONFIG, f"out_dir={out}",
                       f"data.train_shards={tiny_set}", *SLOW_STEPS], module=True)
    return out


# The stop file is what SLURM's trap touches; test_slurm's preemption test and test_faults' busy
# out_dir test stop runs through it by default, so here it runs with `-m slow` and SIGTERM by default.
# That a resume from a preemption checkpoint is bit-exact is shown by test_slurm's requeued job and
# test_faults' hard kills; the SIGTERM run checks what only it can: every rank stops on the signal
# with a checkpoint, and the run resumes to its end.
@pytest.mark.parametrize("how", [pytest.param("stop_file", marks=pytest.mark.slow), "sigterm"])
def test_preemption_checkpoints_every_rank_and_resumes(how, tiny_set, tmp_path):
    run = tmp_path / "preempted"
    proc = _launch_background(run, tiny_set, *SLOW_STEPS)
    _wait_for_line(proc, "step 3 ")
    if how == "stop_file":
        (run / "STOP").touch()
    else:
        proc.send_signal(signal.SIGTERM)  # to the launcher, as SLURM signals the job step
    rest = proc.stdout.read()
    proc.wait(timeout=120)
    assert "preempted" in rest, rest[-3000:]
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 3 <= stopped_at < 40
    if how == "stop_file":
        assert proc.returncode != 0  # accelerate reports the workers' exit 75 as a failure
    resumed = accelerate_launch(["weatherkd", "teacher", "--config", CONFIG, f"out_dir={run}",
                                 f"data.train_shards={tiny_set}", *SLOW_STEPS], module=True)
    assert f"step-{stopped_at:07d}" in resumed.stderr and "resumed from" in resumed.stderr
    assert not (run / "STOP").exists()
    assert json.loads((run / "metrics.json").read_text())["step"] == 40
    if how == "stop_file":
        assert_same_weights(_straight_slow(tiny_set, tmp_path), run)


def test_single_process_exit_code_on_preemption(tiny_set, tmp_path):
    run = tmp_path / "single"
    run.mkdir()
    (run / "STOP").touch()
    proc = run_cli("teacher", "--config", CONFIG, f"out_dir={run}", f"data.train_shards={tiny_set}", check=False)
    from weatherkd.engine import EXIT_PREEMPTED

    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000000"


def test_single_process_features_and_tracking(tiny_set, tmp_path):
    """bf16 autocast, channels_last, grad accumulation + clipping, CutMix and EMA in one plain process,
    with everything the engine tracks read back from the offline W&B run."""
    run = tmp_path / "features"
    env = cli_env(HOME=str(tmp_path))
    env.pop("WANDB_MODE")
    run_cli("teacher", "--config", CONFIG, f"out_dir={run}", f"data.train_shards={tiny_set}", "tracker.kind=wandb",
            "train.mixed_precision=bf16", "train.channels_last=true", "train.grad_accum=2", "train.grad_clip=0.5",
            "data.cutmix_prob=0.5", "train.ema_decay=0.5", env=env)
    weights = load_file(run / "model" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())
    wandb = Path(sys.executable).parent / "wandb"
    (run_dir,) = (run / "wandb").glob("offline-run-*")
    out = subprocess.run([str(wandb), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         check=True).stdout
    history = [json.loads(line)["history"]["item"] for line in out.splitlines() if '"type":"history"' in line]
    keys = set().union(*history)
    for key in ("train/loss", "train/lr", "perf/samples_per_s", "perf/data_wait_frac", "perf/max_rss_mb",
                "val/psnr", "val/ssim", "val/psnr/snow", "data/corrupt_skipped"):
        assert key in keys, key
    assert any(k.startswith("val/input_pred_target") for k in keys)
    assert list((run_dir / "files" / "media" / "images").rglob("*.png"))
    config = (run / "config.yaml").read_text()
    assert "mixed_precision: bf16" in config and "grad_accum: 2" in config
