"""Teacher inversion's terms on known inputs, and a BatchNorm teacher, in process."""

import pytest
import torch
from conftest import dreamer
from weatherkd import models
from weatherkd.losses import inversion as I


def test_orthogonality_and_priors_on_known_inputs():
    same = torch.ones(4, 8)
    assert float(I.orthogonality(same)) == pytest.approx(1.0)  # identical features: cosine 1 everywhere
    assert float(I.orthogonality(torch.eye(4))) == 0.0
    assert float(I.mean_pairwise_distance(torch.eye(4))) == pytest.approx(2 ** 0.5)
    flat = torch.full((1, 3, 8, 8), 0.5)
    assert float(I.total_variation(flat)) == 0.0 and float(I.l2_prior(flat)) == 0.0
    x = torch.randn(2, 4, 8, 8)
    m, v = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    assert float(I.statistics(x, m, v)) == pytest.approx(0.0, abs=1e-5)
    assert float(I.statistics(x, m + 1, v)) == pytest.approx(2.0, rel=1e-4)  # ‖(1, 1, 1, 1)‖₂
    assert float(I.statistics(x.permute(0, 2, 3, 1), m, v, channel_dim=-1)) == pytest.approx(0.0, abs=1e-5)


def test_batchnorm_teacher_is_inverted_towards_its_running_statistics(tmp_path):
    net = models.build("unet_bn", size="tiny")
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    models.save(net, tmp_path / "bn", extra={"weathers": ["rain_haze", "snow"]})
    d = dreamer(tmp_path / "bn", tmp_path, "iterations=25", "w_ortho=0.5")
    assert d.prov["stats"] == "batchnorm" and d.weathers == ["rain_haze", "snow"]
    assert d.stat_groups(torch.tensor([0, 1, 0])) == [("all", None)]  # BN statistics are not per weather
    first = d.order[0]
    assert torch.equal(d.targets[f"all/{first}/mean"], dict(d.teacher.named_modules())[first].running_mean)
    _, history, _ = d.dream(list(range(4)))
    assert history[-1] < history[0]
