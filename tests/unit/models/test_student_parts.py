"""Students, the DCKD losses and the VQ model, in process."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
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
    teacher = models.build("clipweather_net", size=demo["size"], prior_dim=64, text_dim=32, **demo.get("kwargs", {}))
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


def test_contrastive_gradient_is_autograds_of_the_formula():
    torch.manual_seed(0)
    shapes, weights = [(2, 4, 8, 8), (2, 8, 4, 4)], [0.25, 1.0]
    s = [torch.randn(*sh, dtype=torch.float64, requires_grad=True) for sh in shapes]
    t = [torch.randn(*sh, dtype=torch.float64) for sh in shapes]
    negs = [[torch.randn(*sh, dtype=torch.float64) for sh in shapes] for _ in range(3)]
    negs[0][0][0, 0, 0, 0] = s[0][0, 0, 0, 0].detach()  # a tie: sign(0) = 0 both ways

    def formula(student):
        return sum(w * (a - b).abs().mean() / (sum((a - n[i]).abs().mean() for n in negs) + 1e-7)
                   for i, (w, a, b) in enumerate(zip(weights, student, t)))

    ours, reference = D.contrastive(s, t, negs, weights), formula(s)
    assert float(ours) == pytest.approx(float(reference), rel=1e-12)
    got = torch.autograd.grad(ours, s)
    want = torch.autograd.grad(reference, s)
    assert all(torch.allclose(g, w, rtol=1e-10, atol=1e-14) for g, w in zip(got, want))
    assert torch.autograd.gradcheck(lambda a, b: D.contrastive([a, b], t, negs, weights), tuple(s))
    with pytest.raises(ValueError, match="must not require grad"):
        D.contrastive(s, [x.requires_grad_() for x in t], negs, weights)


def test_vq_gives_levels_and_code_distributions():
    vq = models.build("vq", widths=[8, 16], codes=32, code_dim=8)
    feats = vq.features(torch.rand(2, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [8, 16, 8]
    logits = vq.code_logits(feats[-1])
    assert logits.shape == (2, 32, 16, 16)
    recon, loss = vq(torch.rand(1, 3, 30, 30), return_loss=True)
    assert recon.shape == (1, 3, 30, 30) and loss.item() >= 0
