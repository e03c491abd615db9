"""Frozen copies for in-step forwards: batch norm folded exactly, weights in the compute dtype."""

import torch

from weatherkd import models
from weatherkd.models.fusion import fold_batchnorm, frozen_copy
from rounding import gamma, roundings_through


def _trained_bn_student():
    torch.manual_seed(0)
    student = models.build("unet_bn", size="tiny")
    for p in student.parameters():  # the output conv starts at zero: give every layer a part to play
        torch.nn.init.normal_(p, std=0.2)
    for bn in (m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return student.eval()


def test_folding_batch_norm_keeps_the_function_and_removes_every_bn():
    student = _trained_bn_student()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = student(x)
        folded = fold_batchnorm(student)
        after = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert (before - x).abs().max() > 0.1  # not the identity start: the folded layers matter
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_frozen_copy_is_bf16_frozen_and_leaves_the_original_alone():
    student = _trained_bn_student()
    x = torch.rand(2, 3, 32, 32)
    copy = frozen_copy(student, torch.bfloat16, channels_last=True)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in student.modules())  # the original keeps its BN
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in copy.parameters())
    conv = next(m for m in copy.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = student(x), copy(x.to(torch.bfloat16)).float()
    # bf16's rounding, not another function: the copy's roundings (two interpolations and the
    # residual sum are no modules), against the largest output (tests/rounding.py)
    bound = gamma(roundings_through(copy, functional=3), torch.bfloat16) * ref.abs().max()
    assert (out - ref).abs().max() <= bound
    assert (ref - x).abs().max() > 2 * bound  # and the net is not the identity it starts as
