"""Tiled inference: exact where the model's receptive field fits the trimmed margin, and seamless
where it does not (hard cuts at the middle of the overlap leave a step there)."""

import pytest
import skimage.data
import torch
import torch.nn.functional as F

from weatherkd.models.tiling import ramp_window, tile_starts, tiled


def photo(h: int, w: int) -> torch.Tensor:
    img = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(img, size=(h, w), mode="area")


class SeesPastTheOverlap(torch.nn.Module):
    """A 31-pixel box blur plus a term from the whole tile's mean (as NAFNet's channel attention
    pools its whole input): its receptive field is the whole tile, wider than any overlap."""

    def forward(self, x):
        blur = F.avg_pool2d(x, 31, stride=1, padding=15, count_include_pad=True)
        return x + 0.3 * (blur - 0.5) + 0.2 * (x.mean(dim=(1, 2, 3), keepdim=True) - 0.5)


def hard_cut_tiles(model, x, tile: int, overlap: int) -> torch.Tensor:
    """What `eval --tile` did before: each tile's output pasted from the middle of its overlap on."""
    h, w = x.shape[-2:]
    margin, out = overlap // 2, torch.empty_like(x)
    for y0 in tile_starts(h, tile, overlap):
        for x0 in tile_starts(w, tile, overlap):
            p = model(x[..., y0:y0 + tile, x0:x0 + tile])
            top, left = (0 if y0 == 0 else margin), (0 if x0 == 0 else margin)
            out[..., y0 + top:y0 + p.shape[-2], x0 + left:x0 + p.shape[-1]] = p[..., top:, left:]
    return out


def seam_ratio(out: torch.Tensor, x: torch.Tensor, tile: int, overlap: int) -> float:
    """Largest gradient energy of the model's correction (out - x) on any line inside a tile
    overlap, over the largest anywhere else; columns and rows, the worse of the two."""
    r = out - x
    worst = 0.0
    for dim in (-1, -2):
        d = r.diff(dim=dim) ** 2
        energy = d.mean(dim=(0, 1, 2) if dim == -1 else (0, 1, 3))
        n = r.shape[dim]
        band = sorted({c for s in tile_starts(n, tile, overlap)[1:] for c in range(s, s + overlap)})
        other = [c for c in range(n - 1) if c not in band]
        worst = max(worst, float(energy[band].max() / energy[other].max()))
    return worst


def test_windows_sum_to_one_across_an_overlap():
    n, overlap = 64, 16
    a, b = ramp_window(n, overlap, False, True), ramp_window(n, overlap, True, False)
    together = a[n - overlap:] + b[:overlap]
    assert torch.allclose(together, torch.ones(overlap), atol=1e-6)
    assert a[-overlap // 4:].max() == 0 and b[:overlap // 4].max() == 0  # the tile's padded edge is never used


@torch.no_grad()
def test_a_model_that_fits_the_margin_is_unchanged_by_tiles():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    x = torch.rand(2, 3, 150, 170)
    # receptive radius 2 <= overlap // 4 = 4: every tile pixel that gets weight is exact
    assert torch.allclose(tiled(conv, x, 64, 16, max_batch=3), conv(x), atol=1e-6)
    assert torch.allclose(tiled(conv, x, (48, 80), 16), conv(x), atol=1e-6)
    small = x[..., :60, :50]
    assert torch.equal(tiled(conv, small, 64, 16), conv(small))
    with pytest.raises(ValueError, match="overlap"):
        tiled(conv, x, 64, 64)


@torch.no_grad()
def test_blended_tiles_leave_no_seam_where_hard_cuts_do():
    model, x, tile, overlap = SeesPastTheOverlap(), photo(200, 264), 128, 48
    whole, blended, cut = model(x), tiled(model, x, tile, overlap), hard_cut_tiles(model, x, tile, overlap)
    # The bound: tiles see less of the image than the whole, so the per-tile mean term moves the
    # result by up to 0.2 × (the spread of tile means); on this photo that stays under these.
    assert (blended - whole).abs().mean() < 0.02 and (blended - whole).abs().max() < 0.035
    # No line in an overlap carries more gradient energy than the strongest line elsewhere...
    assert seam_ratio(blended, x, tile, overlap) <= 1.0
    # ...while the hard cut's step is many times stronger than anything else in the image.
    assert seam_ratio(cut, x, tile, overlap) > 5
    assert seam_ratio(whole, x, tile, overlap) <= 1.0  # the untiled model has no seam either
