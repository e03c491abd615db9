"""The CLIP-guided teacher: towers, losses that would fail if wrong, the model, and the stage under ZeRO."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import accelerate_launch

from weatherkd import models
from weatherkd.models import feature_stats


def test_frozen_towers_build_no_autograd_graph(tmp_path, builtin_set):
    from weatherkd.recipes.teacher import Config, TeacherRecipe
    from weatherkd import config as C

    cfg = C.load(Config, "configs/teacher/demo.yaml", [f"data.train_shards={builtin_set}"])
    recipe = TeacherRecipe(cfg)
    for tower in recipe.frozen.values():
        tower.requires_grad_(False).eval()
    x = torch.rand(2, 3, 32, 32)
    batch = {"input": x, "target": torch.rand_like(x), "weather_soft": torch.eye(3)[[0, 2]]}
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        prior = recipe.clip_prior(x)
    assert packed == [] and prior.grad_fn is None and not prior.requires_grad
    # The check can fail: the same tower with autograd on keeps activations for backward.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        recipe.frozen["clip_image"](x.requires_grad_())
    assert packed
    x.requires_grad_(False)
    losses = recipe.step(recipe.model, batch, step=cfg.loss.srd_start)
    assert {"pixel", "ssim", "psnr", "text", "srd", "loss"} <= set(losses)
    losses["loss"].backward()
    assert all(p.grad is None for t in recipe.frozen.values() for p in t.parameters())
    assert recipe.model.prior_embed[0].weight.grad is not None  # the text loss reaches the prior layers
    assert recipe.model.stages[0].blocks[0].ffn.sar.mixer[-1].weight.grad is not None  # SRD reaches the SAR


def bf16_rounded(t: torch.Tensor) -> bool:
    return bool((t == t.bfloat16().float()).all())


# ZeRO-3 in bf16 here, as the allweather teacher trains; the demo test trains the same teacher under
# ZeRO-2 in fp32.
@pytest.mark.parametrize("launch", ["cpu-zero3"])
def test_teacher_stage_trains_exports_and_reports(launch, builtin_set, tmp_path):
    out = tmp_path / launch
    accelerate_launch(["weatherkd", "teacher", "--config", "configs/teacher/demo.yaml", f"out_dir={out}",
                       f"data.train_shards={builtin_set}", "model.size=tiny", "train.max_steps=6",
                       "train.eval_every=3", "ckpt.every=3", "train.log_every=3", "tracker.kind=none",
                       "loss.srd_start=3", "data.crop=32", "data.num_workers=0", "train.mixed_precision=bf16"],
                      config=f"launch/{launch}.yaml", module=True)
    # DeepSpeed holds the trained weights in bf16 and their fp32 masters in its optimizer, and the
    # engine cast the frozen CLIP tower to bf16: the export has neither rounded copy. (A random
    # fp32 weight tensor is almost never exactly representable in bf16.)
    exported = load_file(out / "model" / "model.safetensors")
    assert not bf16_rounded(exported["net.stages.0.blocks.0.ffn.sar.mixer.0.weight"])  # trained, from the masters
    assert not bf16_rounded(exported["prior.visual.conv1.weight"])  # the CLIP tower as loaded
    assert (out / "config.yaml").read_text().count("mixed_precision: bf16") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["random_init"] is True and metrics["ranks_in_sync"]
    assert metrics["parallelism"] == f"deepspeed-{launch.split('-')[1]}"
    assert metrics["protocol"] == "rgb" and set(metrics["weathers"]) == {"rain_haze", "raindrop", "snow"}
    assert all(v["n"] == 2 for v in metrics["weathers"].values())
    assert set(metrics["identity"]["mean"]) == {"psnr", "ssim"}
    spec = json.loads((out / "model" / "model.json").read_text())
    assert spec["arch"] == "clipweather" and spec["random_init"] is True
    teacher = models.load(out / "model").eval()
    with torch.no_grad():
        assert teacher(torch.rand(1, 3, 45, 61)).shape == (1, 3, 45, 61)
    # Exported with its weather classifier and, for teacher inversion, feature statistics recorded
    # by both ranks over the training crops: overall and per weather.
    assert teacher.weathers == ["rain_haze", "raindrop", "snow"] and teacher.weather_text.abs().sum() > 0
    stats, meta = feature_stats.load(out / "model")
    assert meta["weathers"] == teacher.weathers and meta["batches"] == 2 * 16
    assert "net.stages.0.blocks.0.norm1" in meta["layers"] and "prior.visual.ln_pre" in meta["layers"]
    for group in ("all", *teacher.weathers):
        mean, var = stats[f"{group}/net.stages.3.norm/mean"], stats[f"{group}/net.stages.3.norm/var"]
        assert mean.shape == var.shape == (64,) and (var > 0).all()
