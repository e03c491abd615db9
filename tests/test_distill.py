"""Students, the VQ model, DCKD's terms and the distill stage under real 2-process DDP."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from conftest import accelerate_launch, run_cli

from weatherkd import models
from weatherkd.losses import distill as D


def gflops(model, *args):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args)
    return counter.get_total_flops() / 1e9


def test_students_use_ten_times_fewer_flops_than_the_demo_teacher():
    x = torch.rand(1, 3, 256, 256)
    import yaml

    demo = yaml.safe_load(open("configs/teacher/demo.yaml"))["model"]
    teacher = models.build("clipweather_net", size=demo["size"], prior_dim=64, text_dim=32)
    teacher_flops = gflops(teacher, x, torch.rand(1, 64))
    for arch in ("unet_bn", "nafnet"):
        student = models.build(arch, size="tiny")
        assert gflops(student, x) * 10 <= teacher_flops, arch
        assert student(torch.rand(2, 3, 37, 45)).shape == (2, 3, 37, 45)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in models.build("unet_bn").modules())


def test_contrastive_ratio_and_distribution_mapping():
    torch.manual_seed(0)
    s, t = [torch.randn(2, 4, 8, 8)], [torch.randn(2, 4, 8, 8)]
    negs = [[torch.randn(2, 4, 8, 8)], [torch.randn(2, 4, 8, 8)]]
    expected = (s[0] - t[0]).abs().mean() / ((s[0] - negs[0][0]).abs().mean() + (s[0] - negs[1][0]).abs().mean())
    assert float(D.contrastive(s, t, negs, [0.5])) == pytest.approx(0.5 * float(expected), rel=1e-6)
    assert float(D.contrastive(t, t, negs, [1.0])) == 0.0  # the student at the teacher: nothing to pull
    logits = torch.randn(2, 16, 4, 4)
    same = D.distribution_mapping(logits, logits)
    entropy = -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1).mean()
    assert float(same) == pytest.approx(float(entropy), rel=1e-6)  # CE(p, p) = H(p): its minimum
    assert float(D.distribution_mapping(torch.randn(2, 16, 4, 4), logits)) > float(same)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    for kind in ("blur", "resize", "noise", "weather"):
        neg = D.degrade(x, kind, x.flip(-1), g)
        assert neg.shape == x.shape and not torch.equal(neg, x)


def test_vq_gives_levels_and_code_distributions():
    vq = models.build("vq", widths=[8, 16], codes=32, code_dim=8)
    feats = vq.features(torch.rand(2, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [8, 16, 8]
    logits = vq.code_logits(feats[-1])
    assert logits.shape == (2, 32, 16, 16)
    recon, loss = vq(torch.rand(1, 3, 30, 30), return_loss=True)
    assert recon.shape == (1, 3, 30, 30) and loss.item() >= 0


@pytest.fixture(scope="module")
def kd_inputs(builtin_set, tmp_path_factory):
    """A tiny teacher and VQ, trained and exported by the real stages."""
    root = tmp_path_factory.mktemp("kd")
    run_cli("teacher", "--config", "configs/teacher/demo.yaml", f"out_dir={root / 'teacher'}",
            f"data.train_shards={builtin_set}", "train.max_steps=4", "tracker.kind=none", "data.crop=32",
            "train.eval_every=0")
    run_cli("vq", "--config", "configs/vq/demo.yaml", f"out_dir={root / 'vq'}", f"data.train_shards={builtin_set}",
            "train.max_steps=4", "tracker.kind=none", "data.crop=32")
    return builtin_set, root / "teacher" / "model", root / "vq" / "model"


def distill(out, shards, teacher, vq, *overrides):
    return accelerate_launch(["weatherkd", "distill", "--config", "configs/distill/demo-dckd.yaml", f"out_dir={out}",
                              f"data.train_shards={shards}", f"teacher={teacher}", f"vq={vq}", "tracker.kind=none",
                              "data.crop=32", "train.eval_every=0", "train.log_every=2", "ckpt.every=4",
                              "history.every=[1,2]", "history.milestones=[4]", "train.schedule=constant",
                              *overrides], module=True)


def test_dckd_under_ddp_resumes_with_all_kd_state(kd_inputs, tmp_path):
    shards, teacher, vq = kd_inputs
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill(straight, shards, teacher, vq, "train.max_steps=8")
    distill(split, shards, teacher, vq, "train.max_steps=4")
    distill(split, shards, teacher, vq, "train.max_steps=8")
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(split / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resume must restore EMA, history model and its schedule"
    metrics = json.loads((split / "metrics.json").read_text())
    assert metrics["ranks_in_sync"] and metrics["world_size"] == 2 and metrics["random_init"] is True
    assert set(metrics["weathers"]) == {"rain_haze", "raindrop", "snow"}
    # The history model is in the checkpoint: 4 updates at s=1 (steps 1-4), then s=2 (steps 6, 8).
    from weatherkd.stages.distill import Config, DistillRecipe
    from weatherkd import config as C

    cfg = C.load(Config, "configs/distill/demo-dckd.yaml", [f"teacher={teacher}", f"vq={vq}",
                                                             "history.every=[1,2]", "history.milestones=[4]"])
    recipe = DistillRecipe(cfg)
    assert [recipe.history_interval(s) for s in (1, 3, 4, 5, 8)] == [1, 1, 2, 2, 2]
    from weatherkd.engine import checkpoint

    state = checkpoint.load_state_tree(split / "checkpoints" / "step-0000008")["recipe"]
    assert state["history_updates"] == 6 and "history" in state
    spec = json.loads((split / "model" / "model.json").read_text())
    assert spec["arch"] == "unet_bn" and spec["objective"] == "dckd"


def test_frozen_parts_build_no_graph_and_targetless_tars_work(kd_inputs):
    shards, teacher, vq = kd_inputs
    from weatherkd.stages.distill import Config, DistillRecipe
    from weatherkd import config as C

    cfg = C.load(Config, "configs/distill/demo-dckd.yaml", [f"teacher={teacher}", f"vq={vq}"])
    recipe = DistillRecipe(cfg)
    for module in recipe.frozen.values():
        module.requires_grad_(False).eval()
    x = torch.rand(2, 3, 32, 32)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        recipe.teacher_output({"input": x})
    assert packed == []
    losses = recipe.step(recipe.model, {"input": x}, step=0)  # no target: the teacher is the target
    assert {"kd", "contrast", "dmm", "loss"} <= set(losses) and "gt" not in losses
    losses["loss"].backward()
    assert all(p.grad is None for m in recipe.frozen.values() for p in m.parameters())
    assert all(p.grad is not None for p in recipe.model.parameters() if p.requires_grad)
    cached = torch.rand(2, 3, 32, 32)
    assert torch.equal(recipe.teacher_output({"input": x, "teacher": cached}), cached)
