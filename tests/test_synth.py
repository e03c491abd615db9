"""D4IR: the prompt adapter and the sharded Stable Diffusion synthesis job, with a tiny random SD
saved in diffusers' layout and loaded back the way real weights are."""

import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, accelerate_launch, cli_env, make_set, run_cli, refused
from tiny_sd import save_d4ir_parts, save_tiny_sd
from weatherkd import models

WEATHERS = ["rain_haze", "raindrop", "snow"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return save_d4ir_parts(tmp_path_factory.mktemp("d4ir"))


def synth_args(parts, out, *extra):
    return ["synth", "--config", "configs/synth/demo.yaml", f"out_dir={out}", f"sd_path={parts['sd']}",
            f"adapter={parts['adapter']}", f"clean={parts['clean']}", f"teacher={parts['teacher']}", "size=32",
            "steps=4", "strength=0.5", "shard_size=3", "batch_size=2", *extra]


def tars(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.tar"))}


@pytest.fixture(scope="module")
def reference(parts):
    out = parts["root"] / "reference"
    run_cli(*synth_args(parts, out))
    return out


def test_one_process_writes_a_complete_distillation_set(reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["splits"] == {"train": {"mixed": 21}} and manifest["has_target"] == {"train": False}
    assert len(manifest["shards"]) == 7
    run_cli("shards", "inspect", reference)
    from weatherkd.data.check import iter_tar

    raw = next(iter_tar(reference / "train-mixed-000000.tar"))
    assert {"input.png", "teacher.png", "prov.json", "weather.cls"} <= set(raw) and "target.png" not in raw
    prov = json.loads(raw["prov.json"])
    assert {"seed", "weather", "prompt_id", "strength", "steps", "sd", "adapter"} <= set(prov)
    assert any(k.startswith("unet/") for k in prov["sd"])


# slice.index/count are also what test_slurm's synthesis array sets, by default.
@pytest.mark.slow
def test_two_array_tasks_together_write_the_same_set(parts, reference, tmp_path):
    out = tmp_path / "array"
    procs = [subprocess.Popen([sys.executable, "-m", "weatherkd", *synth_args(parts, out)], cwd=REPO,
                              env=cli_env(SLURM_ARRAY_TASK_ID=str(t), SLURM_ARRAY_TASK_MIN="0",
                                          SLURM_ARRAY_TASK_MAX="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for t in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert "task 0/2: 4 of its 4 shards" in logs[0] and "task 1/2: 3 of its 3 shards" in logs[1]
    assert tars(out) == tars(reference)
    merged, ref = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    assert merged["shards"] == ref["shards"] and merged["splits"] == ref["splits"]


def test_two_launched_processes_each_on_their_own_device_write_the_same_set(parts, reference, tmp_path):
    out = tmp_path / "launched"
    accelerate_launch(["weatherkd", *synth_args(parts, out)], module=True)
    assert tars(out) == tars(reference)
    tasks = [json.loads((out / "tasks" / f"task-{t}-of-2.json").read_text()) for t in (0, 1)]
    assert [(t["rank"], t["local_rank"], t["world_size"]) for t in tasks] == [(0, 0, 2), (1, 1, 2)]
    # What accelerate's placement gives each local rank (the engine's own rule): never all on cuda:0.
    expected = [f"cuda:{t['local_rank']}" if torch.cuda.is_available() else "cpu" for t in tasks]
    devices = [t["device"] if torch.cuda.is_available() else torch.device(t["device"]).type for t in tasks]
    assert devices == expected
    assert tasks[0]["shards"] == [0, 2, 4, 6] and tasks[1]["shards"] == [1, 3, 5]


def test_a_job_killed_mid_shard_resumes_to_an_identical_set(parts, reference, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "weatherkd", *synth_args(parts, out)], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("*.tar.json")):
        assert time.time() < deadline and proc.poll() is None, "no shard finished"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done_before = {p.name for p in out.glob("*.tar.json")}
    assert 0 < len(done_before) < 7
    rerun = run_cli(*synth_args(parts, out)).stderr
    assert f"{7 - len(done_before)} of its 7 shards to write" in rerun
    assert tars(out) == tars(reference) and not list(out.glob(".*.tmp"))


def test_bad_settings_are_clear_errors(parts, tmp_path):
    from weatherkd import config as cfgmod
    from weatherkd.jobs import synth

    # Checked when the config loads, before anything is built:
    for extra, message in [(["strength=0.1", "steps=4"], "runs no denoising step"),
                           (["strength=1.5"], "strength must be in (0, 1]"), (["size=30"], "multiple of 8")]:
        with pytest.raises(cfgmod.ConfigError, match=re.escape(message)):
            cfgmod.load(synth.Config, "configs/synth/demo.yaml", extra)
    for extra, message in [([f"sd_path={tmp_path}"], "is not a local diffusers Stable Diffusion folder")]:
        proc = refused(*synth_args(parts, tmp_path / "x", *extra))
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    wide = tmp_path / "wide-sd"
    save_tiny_sd(wide, cross_attention_dim=16)
    proc = refused(*synth_args(parts, tmp_path / "y", f"sd_path={wide}"))
    assert proc.returncode == 1 and "cross_attention_dim is 16" in proc.stderr


def test_distill_trains_from_the_synthesised_tars(parts, reference, tmp_path):
    out = tmp_path / "student"
    eval_set = tmp_path / "eval"
    make_set(eval_set, {("test", w): 1 for w in WEATHERS}, size=32)
    run_cli("distill", "--config", "configs/distill/demo.yaml", "objective=kd", f"out_dir={out}",
            f"data.train_shards={reference}", f"data.eval_shards={eval_set}", f"teacher={parts['teacher']}",
            "train.max_steps=3", "train.eval_every=0", "ckpt.every=3", "data.crop=16", "data.batch_size=4",
            "tracker.kind=none", "data.num_workers=0")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 3 and metrics["n"] == 3


def test_adapter_stage_trains_over_two_processes_and_exports_prompts(tmp_path):
    """Unpaired degraded images: the shards hold inputs only. In bf16, as the allweather config
    trains (the demo's runs in fp32): its own validation ran the bf16 CLIP tower on fp32 inputs."""
    degraded, out = tmp_path / "degraded", tmp_path / "adapter"
    make_set(degraded, {(split, w): n for w in WEATHERS for split, n in (("train", 8), ("test", 2))}, size=40,
             target=False)
    accelerate_launch(["weatherkd", "adapter", "--config", "configs/adapter/demo.yaml", f"out_dir={out}",
                       f"data.train_shards={degraded}", "train.max_steps=6", "train.eval_every=3",
                       "ckpt.every=3", "data.crop=32", "data.batch_size=6", "tracker.kind=none",
                       "train.mixed_precision=bf16"], module=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "prompt_retrieval" and metrics["n"] == 6 and metrics["world_size"] == 2
    assert metrics["ranks_in_sync"] and 0 <= metrics["accuracy"] <= 1 and metrics["random_init"]
    adapter = models.load(out / "model")
    assert adapter.weathers == WEATHERS and adapter.weather_prompts.shape == (3, 4, 32)
    assert adapter.weather_prompts.abs().sum(dim=(1, 2)).min() > 0  # every weather has its mean prompt
    # The CLIP tower as loaded, not the bf16 copy it ran as (random fp32 weights are almost never
    # exactly representable in bf16).
    tower = next(v for k, v in load_file(out / "model" / "model.safetensors").items() if k.endswith("visual.conv1.weight"))
    assert not torch.equal(tower, tower.bfloat16().float())


def test_bench_synth_compares_with_the_stock_pipeline(parts):
    out = json.loads(run_cli("bench", "synth", "--sd-path", parts["sd"], "--images", 2, "--batch-size", 2,
                             "--size", 32, "--steps", 2).stdout)
    assert set(out["images_per_s"]) == {"weatherkd_batched", "diffusers_one_by_one"} and out["speedup"] > 0


def test_clean_images_read_straight_from_tar_offsets(parts):
    import numpy as np

    from weatherkd.data.check import iter_tar
    from weatherkd.data.samples import decode_sample
    from weatherkd.data.shards import open_set
    from weatherkd.jobs.synth import CleanImages, _square

    clean = CleanImages(str(parts["clean"]), "train", 0)
    shard_set = open_set(parts["clean"])
    ref = [decode_sample(r) for s in shard_set.shards("train") for r in iter_tar(shard_set.dir / s["file"])]
    assert [key for _, key, _ in clean.items] == [r["__key__"] for r in ref] and len(ref) == 7
    assert all(np.array_equal(clean.load(i, 24), _square(r["target"], 24)) for i, r in enumerate(ref))
