"""PSNR/SSIM under both protocols agree with scikit-image (and an independent BT.601 conversion) to 1e-4."""

import numpy as np
import pytest
import skimage.data
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from weatherkd.metrics import psnr, psnr_batch, ssim, ssim_batch


def bt601_y(img: np.ndarray) -> np.ndarray:
    """Independent luma: ITU-R BT.601 studio swing, Y = 16 + (65.481 R + 128.553 G + 24.966 B), RGB in [0, 1]."""
    rgb = img.astype(np.float64) / 255.0
    return 16.0 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


def sk_ssim(a, b, **kw):
    return structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, **kw)


def pairs():
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    yield rand, np.clip(rand.astype(int) + rng.integers(-30, 30, rand.shape), 0, 255).astype(np.uint8)
    for name in ("astronaut", "coffee"):
        photo = getattr(skimage.data, name)()[:128, :160]
        noisy = np.clip(photo.astype(int) + rng.integers(-12, 12, photo.shape), 0, 255).astype(np.uint8)
        yield photo, noisy


@pytest.mark.parametrize("k", range(3))
def test_against_skimage(k):
    a, b = list(pairs())[k]
    assert abs(psnr(a, b, "rgb") - peak_signal_noise_ratio(a, b, data_range=255)) < 1e-4
    assert abs(ssim(a, b, "rgb") - sk_ssim(a, b, channel_axis=-1)) < 1e-4
    ya, yb = bt601_y(a), bt601_y(b)
    assert 16 <= ya.min() and ya.max() <= 235
    assert abs(psnr(a, b, "y") - peak_signal_noise_ratio(ya, yb, data_range=255)) < 1e-4
    assert abs(ssim(a, b, "y") - sk_ssim(ya, yb)) < 1e-4
    c = 4
    assert abs(psnr(a, b, "y", crop_border=c) - peak_signal_noise_ratio(ya[c:-c, c:-c], yb[c:-c, c:-c],
                                                                        data_range=255)) < 1e-4


def test_batched_torch_matches_per_image():
    items = list(pairs())[1:]
    pred = torch.stack([torch.from_numpy(b).permute(2, 0, 1).float() / 255 for _, b in items])
    target = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a, _ in items])
    for protocol in ("rgb", "y"):
        got_p, got_s = psnr_batch(pred, target, protocol), ssim_batch(pred, target, protocol)
        for i, (a, b) in enumerate(items):
            assert abs(float(got_p[i]) - psnr(b, a, protocol)) < 1e-6
            assert abs(float(got_s[i]) - ssim(b, a, protocol)) < 1e-6


def test_protocols_differ_and_bad_input_is_refused():
    a, b = list(pairs())[1]
    assert abs(psnr(a, b, "y") - psnr(a, b, "rgb")) > 0.1
    with pytest.raises(ValueError, match="unknown protocol"):
        psnr(a, b, "lab")
    with pytest.raises(ValueError, match="uint8"):
        psnr(a.astype(np.float32), b)


def _t(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255


def test_removal_and_damage_split_a_psnr_change_by_where_the_weather_was():
    """Weather on the left half, a model that removes a known share of it there and damages the
    right half: ``removed`` is that share, ``untouched_psnr`` is scikit-image's PSNR of the right half."""
    from weatherkd.engine.validate import EXACT_DB, removal, removal_cells

    rng = np.random.default_rng(1)
    clean = skimage.data.astronaut()[:64, :96]
    weathered = clean.astype(int)
    weathered[:, :48] = np.clip(weathered[:, :48] + 60, 0, 255)  # a bright veil where the weather fell
    weathered[0, 60] = np.where(clean[0, 60] < 255, clean[0, 60] + 1, clean[0, 60] - 1)  # one level is weather too
    inp = weathered.astype(np.uint8)
    out = clean.astype(int)
    out[:, :48] += (inp.astype(int) - clean)[:, :48] // 2  # half the veil left: a quarter of its squared error
    out[:, 48:] = np.clip(out[:, 48:] + rng.integers(-9, 10, out[:, 48:].shape), 0, 255)  # damage
    out = out.astype(np.uint8)

    def split(pred):
        from weatherkd.metrics import weather_split
        return [{k: float(v[0]) for k, v in weather_split(_t(pred), _t(inp), _t(clean)).items()}]

    moved = inp.astype(int) - clean
    veiled = np.abs(moved).max(-1) > 0
    assert veiled[0, 60] and veiled[:, :48].all() and veiled.sum() == 64 * 48 + 1
    se_in = (moved ** 2)[veiled].sum()
    se_out = ((out.astype(int) - clean) ** 2)[veiled].sum()
    got = removal(split(out))
    assert got["removed"] == pytest.approx(1 - se_out / se_in, abs=1e-9)
    assert 0.6 < got["removed"] < 0.9
    expected = peak_signal_noise_ratio(clean[~veiled], out[~veiled], data_range=255)
    assert got["untouched_psnr"] == pytest.approx(expected, abs=1e-6)
    assert got["weather_pixels"] == pytest.approx(veiled.mean())
    # identity removes nothing and is exact where the weather did not fall; the clean image removes everything
    identity = removal(split(inp))
    assert identity["removed"] == 0.0 and identity["untouched_psnr"] > EXACT_DB
    assert removal_cells(identity) == ("0%", "exact") and removal_cells(got)[1] == f"{expected:.1f} dB"
    assert removal(split(clean))["removed"] == 1.0
    # a weather that changed every pixel leaves none to damage: no figure, not "exact"
    everywhere = removal([{**split(out)[0], "se_untouched": 0.0, "untouched_values": 0.0}])
    assert everywhere["untouched_psnr"] is None and removal_cells(everywhere)[1] == "—"
