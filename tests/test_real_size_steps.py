"""Every allweather training stage takes real-size steps on CPU, from real-layout checkpoint files
(random weights: nothing can be downloaded), at a reduced batch and crop; the teacher under
2-process ZeRO-2. Marked slow (~10 min on 2 cores): `python -m pytest -m slow tests/test_real_size_steps.py -s`
prints each stage's seconds per step.

The chain is the real pipeline's: the teacher is exported, the VQ trained, and the students
distil from those exports, so every model in it is the allweather config's, at its real size."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import accelerate_launch, make_set
from weatherkd import cost, models
from weatherkd.models import clip

pytestmark = pytest.mark.slow
SMALL = ["data.crop=64", "data.batch_size=1", "data.num_workers=0", "data.eval_max_samples=2",
         "data.shuffle_buffer=8", "train.max_steps=2", "train.log_every=1", "train.eval_every=2", "ckpt.every=2",
         "tracker.kind=none"]  # each stage in its config's precision: bf16, the teacher's under ZeRO-2 too


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """ViT-B-32, RN50x4 and VGG16 files with their real names, layouts and shapes."""
    import torchvision

    root = tmp_path_factory.mktemp("weights")
    files = {}
    for name in ("ViT-B-32", "RN50x4"):
        (root / "clip" / name).mkdir(parents=True)
        state = {k: v.contiguous() for k, v in clip.build_random(name).state_dict().items()}
        save_file(state, root / "clip" / name / "open_clip_model.safetensors")
        files[name] = root / "clip" / name / "open_clip_model.safetensors"
    torch.save(torchvision.models.vgg16().state_dict(), root / "vgg16-397923af.pth")
    files["vgg"] = root / "vgg16-397923af.pth"
    return files


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("allweather")
    make_set(path, {(split, w): n for split, n in (("train", 4), ("test", 1)) for w in ("rain_haze", "raindrop", "snow")},
             size=96)
    return path


def seconds_per_step(out) -> float:
    progress = json.loads((out / "progress.json").read_text())
    return 1.0 / progress["perf/samples_per_s"] * 2  # 2 processes x batch 1 per step


def test_every_allweather_stage_steps_at_real_size(tmp_path, weights, shards):
    timings = {}
    teacher = tmp_path / "teacher"
    accelerate_launch(["weatherkd", "teacher", "--config", "configs/teacher/allweather.yaml", f"out_dir={teacher}",
                       f"data.train_shards={shards}", f"data.eval_shards={shards}", *SMALL, "loss.srd_start=0", "stats.batches=1",
                       f"model.clip.image.pretrained={weights['ViT-B-32']}",
                       f"model.clip.residual.pretrained={weights['RN50x4']}", f"loss.vgg_weights={weights['vgg']}"],
                      config="launch/cpu-zero2.yaml", module=True, timeout=1200)
    timings["teacher (ZeRO-2)"] = seconds_per_step(teacher)
    exported = models.load(teacher / "model")
    assert abs(cost.params(exported) / 126e6 - 1) <= 0.10 and not models.read_spec(teacher / "model")["random_init"]
    metrics = json.loads((teacher / "metrics.json").read_text())
    assert metrics["parallelism"] == "deepspeed-zero2" and metrics["step"] == 2

    vq = tmp_path / "vq"
    accelerate_launch(["weatherkd", "vq", "--config", "configs/vq/allweather.yaml", f"out_dir={vq}",
                       f"data.train_shards={shards}", f"data.eval_shards={shards}", *SMALL], module=True, timeout=600)
    timings["vq"] = seconds_per_step(vq)

    for config, objective in (("allweather", "dckd"), ("allweather-student-medium", "kd")):
        out = tmp_path / config
        accelerate_launch(["weatherkd", "distill", "--config", f"configs/distill/{config}.yaml", f"out_dir={out}",
                           f"objective={objective}", f"teacher={teacher / 'model'}", f"vq={vq / 'model'}",
                           f"data.train_shards={shards}", f"data.eval_shards={shards}", *SMALL], module=True, timeout=900)
        timings[f"distill {config} ({objective})"] = seconds_per_step(out)
        assert json.loads((out / "metrics.json").read_text())["step"] == 2

    adapter = tmp_path / "adapter"
    accelerate_launch(["weatherkd", "adapter", "--config", "configs/adapter/allweather.yaml", f"out_dir={adapter}",
                       f"data.train_shards={shards}", f"data.eval_shards={shards}", *SMALL, "data.batch_size=3",
                       f"model.clip.pretrained={weights['ViT-B-32']}"], module=True, timeout=600)
    timings["adapter"] = seconds_per_step(adapter) * 3  # batch 3 per process
    assert models.load(adapter / "model").weather_prompts.shape[-1] == 768
    print("\nreal-size CPU seconds per step (2 processes, batch 1 per process, crop 64):",
          json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=1))
