"""`weatherkd prune`: DepGraph structured pruning with per-group ratios from measured sensitivity,
exported as a loadable model and distilled by `weatherkd distill init=...`, over 2 processes."""

import json

import pytest
import torch

from conftest import accelerate_launch, make_set
from weatherkd import config as cfgmod
from weatherkd import cost, models
from weatherkd.commands import prune


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """Calibration inputs without targets, like dreamed tars."""
    path = tmp_path_factory.mktemp("calib") / "set"
    make_set(path, {("train", "rain_haze"): 4, ("train", "snow"): 4}, size=40, target=False)
    return path


def test_pruning_a_batchnorm_net_keeps_its_running_statistics(calib, tmp_path):
    net = models.build("unet_bn", size="tiny")
    bns = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for m in bns.values():
        m.running_mean.copy_(torch.arange(m.num_features, dtype=torch.float32))  # channel i remembers i
    models.save(net, tmp_path / "net")
    prune.run(cfgmod.load(prune.Config, None, [f"network={tmp_path / 'net'}", f"out_dir={tmp_path / 'out'}",
                                               f"calib_shards={calib}", "calib_samples=4", "calib_size=32",
                                               "flops_size=64"]))
    small = dict(models.load(tmp_path / "out" / "model").named_modules())
    narrowed = 0
    for name, bn in bns.items():
        kept = small[name].running_mean.tolist()
        assert kept == sorted(kept) and set(kept) <= set(range(bn.num_features))  # the kept channels' own
        narrowed += len(kept) < bn.num_features
    assert narrowed > 0


def test_two_processes_prune_the_teacher_by_the_requested_flops(tiny_teacher, calib, tmp_path):
    out = tmp_path / "prune"
    accelerate_launch(["weatherkd", "prune", "--config", "configs/prune/demo.yaml", f"network={tiny_teacher}",
                       f"out_dir={out}", f"calib_shards={calib}", "calib_samples=6", "calib_size=32",
                       "flops_size=64", "flops_reduction=0.4"], module=True)
    report = json.loads((out / "prune.json").read_text())
    assert report["flops"]["reduction"] >= 0.4, report["flops"]  # what prune guarantees, on any machine
    assert report["params"]["after"] < report["params"]["before"]
    ratios = [g["ratio"] for g in report["groups"].values()]
    assert len(report["groups"]) >= 10 and len(set(round(r, 4) for r in ratios)) > 3  # adaptive, not one ratio
    assert all(g["flops_saved"] > 0 for g in report["groups"].values())  # every group was probed (by some rank)
    spec = json.loads((out / "model" / "model.json").read_text())
    assert spec["arch"] == "pruned" and spec["kwargs"]["base"]["arch"] == "clipweather"
    assert spec["random_init"] is True and spec["pruned_from"] == str(tiny_teacher)
    model = models.load(out / "model")
    teacher = models.load(tiny_teacher)
    assert cost.flops(model, 64) == report["flops"]["after"]
    assert 1 - cost.flops(model, 64) / cost.flops(teacher, 64) >= 0.4
    model.train()
    y = model(torch.rand(2, 3, 40, 56))
    y.mean().backward()  # forward and backward at a size it was never traced at
    assert y.shape == (2, 3, 40, 56) and model.net.head[0].weight.grad is not None


# The quick demo test runs the same chain by default (prune -> distill-pruned on dreamed tars) and checks
# the pruned arch of its result; this checks the details.
@pytest.mark.slow
def test_the_pruned_teacher_is_distilled_on_targetless_tars(tiny_teacher, calib, builtin_set, tmp_path):
    accelerate_launch(["weatherkd", "prune", "--config", "configs/prune/demo.yaml", f"network={tiny_teacher}",
                       f"out_dir={tmp_path / 'prune'}", f"calib_shards={calib}", "calib_samples=4",
                       "calib_size=32", "flops_size=64"], module=True, nproc=1)
    out = tmp_path / "distill"
    accelerate_launch(["weatherkd", "distill", "--config", "configs/distill/demo-pruned.yaml", f"out_dir={out}",
                       f"teacher={tiny_teacher}", f"init={tmp_path / 'prune' / 'model'}",
                       f"data.train_shards={calib}", f"data.eval_shards={builtin_set}", "data.crop=32",
                       "train.max_steps=3", "train.eval_every=3", "ckpt.every=3", "train.log_every=1",
                       "tracker.kind=none", "data.num_workers=0"], module=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ranks_in_sync"] and metrics["world_size"] == 2 and metrics["step"] == 3
    spec = json.loads((out / "model" / "model.json").read_text())
    assert spec["arch"] == "pruned" and spec["init"] == str(tmp_path / "prune" / "model")
    student = models.load(out / "model")
    start = models.load(tmp_path / "prune" / "model")
    changed = [n for n, p in student.named_parameters() if not torch.equal(p, dict(start.named_parameters())[n])]
    assert changed and not any(n.startswith("prior.") for n in changed)  # the CLIP tower stays frozen
