"""The D4IR adapter's contrastive loss and views, in process."""

import torch
from weatherkd.recipes.adapter import content_changing_view, supcon


def test_supcon_and_content_changing_views():
    labels = torch.tensor([0, 0, 1, 1])
    separated = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1, 0.01], [0, 1], [0.01, 1]]), dim=1)
    mixed = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1], [1, 0.01], [0.01, 1]]), dim=1)
    assert supcon(separated, labels, 0.1) < 0.1 < supcon(mixed, labels, 0.1)
    x = torch.rand(2, 3, 32, 32)
    v = content_changing_view(x, torch.Generator().manual_seed(0), shuffle_prob=1.0, grid=4)
    assert v.shape == x.shape and not torch.allclose(v, x)
