"""`precision.ema_of`: torch's AveragedModel as the EMA (and DCKD's history model), fed weights in
whatever precision the trained module holds them: fp32 under DDP, bf16 or fp16 under DeepSpeed."""

import copy

import pytest
import torch

from weatherkd.precision import ema_of


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ema_averages_weights_of_any_precision_in_fp32(dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = ema_of(net, decay=0.9)
    first, second = copy.deepcopy(net).to(dtype), copy.deepcopy(net).to(dtype)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(torch.rand_like(p))
        second[1].running_mean.add_(1)
    ema.update_parameters(first)  # the first update copies
    ema.update_parameters(second)
    averaged = list(ema.module.parameters()) + [ema.module[1].running_mean]
    firsts = list(first.parameters()) + [first[1].running_mean]
    seconds = list(second.parameters()) + [second[1].running_mean]
    for a, x, y in zip(averaged, firsts, seconds, strict=True):
        assert a.dtype == torch.float32
        # 16-bit weights widen to fp32 exactly, so both sides are fp32 arithmetic on the same
        # values: fp32's default tolerance holds on every CPU, whatever the weights' format.
        torch.testing.assert_close(a, 0.9 * x.float() + 0.1 * y.float())
