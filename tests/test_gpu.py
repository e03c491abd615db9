"""GPU paths, for a machine with CUDA: `python -m pytest -m gpu -s` (docs/testing.md). Where there is
no CUDA device they are skipped, saying so; CI has none and never depends on them.

What they check: the quick demo on every GPU (the teacher under ZeRO-2 in bf16, the students under
DDP over NCCL), every process on its own GPU (its LOCAL_RANK), dckd in bf16 through history
updates (eager and compiled), no host sync inside steady-state student steps
(`torch.cuda.set_sync_debug_mode("error")` around every step after the first), synth in fp16 with
SDPA (and xformers when installed), dream on the GPU, and the step benchmark's MFU against this
GPU's measured matmul peak. Each prints what it measured."""

import json

import pytest
import torch

from conftest import accelerate_launch, cli_env, make_set, run_cli
from tiny_sd import save_d4ir_parts
from rounding import gamma, roundings_through

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA device: the gpu tests need one (CI has none)")]
NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
DDP = "launch/gpu-ddp.yaml" if NGPU > 1 else "launch/gpu-1.yaml"


def gpu_env(**extra) -> dict:
    env = cli_env(**extra)
    env.pop("ACCELERATE_USE_CPU", None)
    env.pop("OMP_NUM_THREADS", None)
    return env


def test_quick_demo_runs_on_every_gpu(tmp_path):
    out, shards = tmp_path / "out", tmp_path / "shards"
    proc = run_cli("demo", "--quick", "--out", out, "--shards", shards, timeout=1800, env=gpu_env())
    assert "launch/gpu-zero2.yaml" in proc.stdout and DDP in proc.stdout
    for stage in ("teacher", "distill-kd", "distill-dckd"):
        metrics = json.loads((out / stage / "metrics.json").read_text())
        assert metrics["rank_devices"] == [f"cuda:{r}" for r in range(NGPU)], stage
        assert metrics["ranks_in_sync"]
    assert json.loads((out / "teacher" / "metrics.json").read_text())["parallelism"] == "deepspeed-zero2"
    assert "mixed_precision: bf16" in (out / "teacher" / "config.yaml").read_text()
    print("\nquick demo on", NGPU, "GPUs:", (out / "report.md").read_text())


def test_students_train_in_bf16_without_host_syncs_in_the_step(tmp_path):
    shards = tmp_path / "set"
    make_set(shards, {("train", w): 16 for w in ("rain_haze", "snow")} | {("test", "snow"): 2}, size=64)
    out = tmp_path / "student"
    accelerate_launch(["weatherkd", "distill", "--config", "configs/distill/demo.yaml", "objective=scratch",
                       f"out_dir={out}", f"data.train_shards={shards}", "data.crop=64", "train.max_steps=20",
                       "train.log_every=10", "train.eval_every=20", "ckpt.every=20", "train.mixed_precision=bf16",
                       "tracker.kind=none"], nproc=NGPU, config=DDP, module=True, timeout=900,
                      env=gpu_env(WEATHERKD_CUDA_SYNC_DEBUG="error"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rank_devices"] == [f"cuda:{r}" for r in range(NGPU)] and metrics["step"] == 20


def test_dckd_in_bf16_with_history_updates_eager_and_compiled_on_the_gpu(tmp_path, builtin_set, tiny_teacher):
    """The allweather configs' dckd path (bf16, the fp32 history model under autocast, history
    updates), eager and with ``dckd.compile``, and the bf16-negatives path compiled: what must hold
    before those configs turn compile on. Prints each run's samples/s."""
    vq = tmp_path / "vq"
    run_cli("vq", "--config", "configs/vq/demo.yaml", f"out_dir={vq}", f"data.train_shards={builtin_set}",
            "train.max_steps=4", "tracker.kind=none", "data.crop=32", "data.num_workers=0", env=gpu_env())
    rates = {}
    for frozen, compile in (("train", "false"), ("train", "true"), ("bf16", "true")):
        out = tmp_path / f"dckd-{frozen}-compile-{compile}"
        accelerate_launch(["weatherkd", "distill", "--config", "configs/distill/demo.yaml", "objective=dckd",
                           f"out_dir={out}", f"data.train_shards={builtin_set}", f"teacher={tiny_teacher}",
                           f"vq={vq / 'model'}", "data.crop=32", "train.max_steps=20", "train.log_every=10",
                           "train.eval_every=20", "ckpt.every=20", "train.mixed_precision=bf16", "history.every=[5]",
                           f"dckd.frozen_precision={frozen}", f"dckd.compile={compile}", "tracker.kind=none"],
                          nproc=NGPU, config=DDP, module=True, timeout=900, env=gpu_env())
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["rank_devices"] == [f"cuda:{r}" for r in range(NGPU)] and metrics["step"] == 20
        assert metrics["ranks_in_sync"]
        progress = json.loads((out / "progress.json").read_text())
        rates[f"frozen {frozen}, compile {compile}"] = progress["perf/samples_per_s"]
    print("\ndckd in bf16 on", torch.cuda.get_device_name(0), "samples/s:", rates)


@pytest.mark.parametrize("attention", ["sdpa", "xformers"])
def test_synth_in_fp16_on_the_gpu(tmp_path, attention):
    if attention == "xformers":
        pytest.importorskip("xformers", reason="xformers is not installed")
    parts = save_d4ir_parts(tmp_path)
    out = tmp_path / "synth"
    accelerate_launch(["weatherkd", "synth", "--config", "configs/synth/demo.yaml", f"out_dir={out}",
                       f"sd_path={parts['sd']}", f"adapter={parts['adapter']}", f"clean={parts['clean']}",
                       f"teacher={parts['teacher']}", "size=64", "steps=4", "max_images=4", "shard_size=4",
                       "dtype=fp16", f"attention={attention}"], nproc=NGPU, config=DDP, module=True,
                      timeout=900, env=gpu_env())
    tasks = [json.loads(p.read_text()) for p in sorted((out / "tasks").glob("task-*.json"))]
    assert [t["device"] for t in tasks] == [f"cuda:{t['local_rank']}" for t in tasks]
    assert "torch.float16" in (out / "manifest.json").read_text()


def test_dream_on_the_gpu_and_the_step_benchmarks_mfu(tmp_path):
    shards = tmp_path / "set"
    make_set(shards, {("train", w): 8 for w in ("rain_haze", "raindrop", "snow")} | {("test", "snow"): 2}, size=64)
    teacher = tmp_path / "teacher"
    accelerate_launch(["weatherkd", "teacher", "--config", "configs/teacher/demo.yaml", f"out_dir={teacher}",
                       f"data.train_shards={shards}", "train.max_steps=4", "train.eval_every=4", "ckpt.every=4",
                       "tracker.kind=none", "stats.batches=2"], nproc=NGPU, config="launch/gpu-zero2.yaml",
                      module=True, timeout=900, env=gpu_env())
    dreamed = tmp_path / "dreamed"
    accelerate_launch(["weatherkd", "dream", "--config", "configs/dream/demo.yaml", f"out_dir={dreamed}",
                       f"teacher={teacher / 'model'}", "samples=16", "iterations=5", "shard_size=4"],
                      nproc=NGPU, config=DDP, module=True, timeout=900, env=gpu_env())
    tasks = [json.loads(p.read_text()) for p in sorted((dreamed / "tasks").glob("task-*.json"))]
    assert [t["device"] for t in tasks] == [f"cuda:{t['local_rank']}" for t in tasks]
    bench = json.loads(run_cli("bench", "step", "--config", "configs/distill/allweather-student-medium.yaml",
                               "objective=scratch", f"data.train_shards={shards}", "data.crop=64", "--steps", "20",
                               env=gpu_env()).stdout)
    assert bench["device"].startswith("cuda") and 0 < bench["mfu"] < 1
    print("\nbench step on", torch.cuda.get_device_name(0), json.dumps(bench, indent=1))


def test_restore_on_the_gpu_in_half_precision(tmp_path):
    """`restore --precision auto` is fp16 on a GPU, channels_last; 16-bit photos stay in fp32."""
    import numpy as np
    from PIL import Image

    from weatherkd import models
    from weatherkd.data import image_files
    from weatherkd.commands import restore

    torch.manual_seed(0)
    net = models.build("unet_bn", size="tiny")
    torch.nn.init.normal_(net.out[0].weight, 0, 0.02)
    model_dir = models.save(net, tmp_path / "m")
    (tmp_path / "in").mkdir()
    yy, xx = np.mgrid[0:600, 0:700]
    smooth = np.stack([(np.sin(xx / 9 + k) * np.cos(yy / 7) + 1) * 127 for k in range(3)], -1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "in" / "a.png")
    for precision in ("fp32", "auto"):
        run_cli("restore", "--model", model_dir, tmp_path / "in", "--out", tmp_path / precision, "--precision",
                precision, "--tile", 256, env=gpu_env())
    a, b = (np.asarray(Image.open(tmp_path / p / "a.png")).astype(int) for p in ("fp32", "auto"))
    print(f"\nrestore fp16 vs fp32 on the GPU: max {np.abs(a - b).max()} levels, mean {np.abs(a - b).mean():.3f}")
    # fp16's rounding through the net (its two interpolations and residual sum are no modules),
    # against outputs in [0, 1], in 8-bit levels, plus one level for the quantisation (tests/rounding.py)
    levels = gamma(roundings_through(net, functional=3), torch.float16) * 255 + 1
    assert np.abs(a - b).max() <= levels
    r = restore.Restorer(models.load(model_dir).cuda().eval(), torch.device("cuda"), "auto", 256, 64, 2)
    deep = image_files.Photo(np.zeros((8, 8, 3), np.float32), None, 16, False)
    assert r.dtype([deep]) == torch.float32 and r.dtype([image_files.Photo(deep.rgb, None, 8, False)]) == torch.float16
