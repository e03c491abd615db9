"""The export's stand-ins for pixel (un)shuffle are the same function, bit for bit."""

import torch
from torch import nn

from weatherkd import models
from weatherkd.models import onnx_friendly


def test_one_hot_convolutions_are_pixel_shuffles_exactly():
    x = torch.randn(2, 5, 12, 18) * 100  # large values: any rounding would show
    assert torch.equal(onnx_friendly.ConvPixelUnshuffle(2)(x), nn.functional.pixel_unshuffle(x, 2))
    assert torch.equal(onnx_friendly.ConvPixelUnshuffle(3)(x), nn.functional.pixel_unshuffle(x, 3))
    y = torch.randn(2, 5 * 4, 7, 9) * 100
    assert torch.equal(onnx_friendly.ConvPixelShuffle(2)(y), nn.functional.pixel_shuffle(y, 2))


def test_for_export_swaps_every_shuffle_in_a_copy():
    net = models.build("nafnet", size="tiny").eval()
    swapped = onnx_friendly.for_export(net)
    kinds = lambda m: {type(x) for x in m.modules()}  # noqa: E731
    assert nn.PixelShuffle in kinds(net) and nn.PixelUnshuffle in kinds(net)  # the original is untouched
    assert not kinds(swapped) & {nn.PixelShuffle, nn.PixelUnshuffle}
    x = torch.rand(1, 3, 37, 50)
    with torch.no_grad():
        assert torch.equal(swapped(x), net(x))
