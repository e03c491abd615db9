"""Prune's allocation and DepGraph export, in process."""

import pytest
import torch

from weatherkd import config as cfgmod
from weatherkd import cost, models
from weatherkd.errors import UserError
from weatherkd.models import pruned
from weatherkd.commands import prune


def test_allocation_prunes_insensitive_groups_more_and_meets_the_target():
    sensitivity = {"a": 1.0, "b": 4.0, "c": 0.25}

    def evaluate(ratios):  # each group a third of the FLOPs, removed in whole channels of 16
        reduction = sum(int(16 * r) / 16 for r in ratios.values()) / 3
        return reduction, dict(ratios)

    ratios, _, measured_at = prune.allocate(sensitivity, evaluate, 0.4, max_ratio=0.8)
    assert measured_at == ratios  # what is returned is what was measured
    assert evaluate(ratios)[0] >= 0.4  # the target is met on the rounded channel counts, not approximately
    assert ratios["c"] > ratios["a"] > ratios["b"]
    with pytest.raises(UserError, match="raise max_ratio"):
        prune.allocate(sensitivity, evaluate, 0.9, max_ratio=0.8)


def test_a_pruned_conv_net_exports_and_reloads_exactly(tmp_path):
    net = models.build("unet_bn", size="tiny").eval()
    models.save(net, tmp_path / "net")
    cfg = cfgmod.load(prune.Config, None, [f"network={tmp_path / 'net'}", "flops_size=64"])
    p = prune.Pruner(models.load(tmp_path / "net"), cfg)
    small = p.prune({g: 0.5 for g in p.groups}).eval()
    assert cost.flops(small, 64) < 0.6 * cost.flops(net, 64)
    small.weatherkd_spec = {"arch": "pruned", "kwargs": pruned.describe(small, net.weatherkd_spec)}
    models.save(small, tmp_path / "small")
    again = models.load(tmp_path / "small").eval()
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        assert torch.equal(again(x), small(x)) and again(x).shape == x.shape
