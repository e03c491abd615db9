"""The physical weather models: statistics that tell the three apart, and an example grid."""

import json

import numpy as np
import pytest
import skimage.data
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from weatherkd.data.samples import to_uint8
from weatherkd.data.weather import MODELS, WeatherParams, degrade


@pytest.fixture(scope="module")
def photos():
    return [skimage.data.astronaut()[::2, ::2][:192, :192] / 255.0, skimage.data.coffee()[::2, ::2][:192, :192] / 255.0]


def _contrast(img):
    return float(img.mean(-1).std())


def test_weathers_are_distinct_and_sane(photos, tmp_path):
    rows, stats = [], {w: [] for w in MODELS}
    for k, clean in enumerate(photos):
        clean = clean.astype(np.float32)
        row = [clean]
        for w in MODELS:
            out, params = degrade(clean, w, np.random.default_rng(k), WeatherParams())
            json.dumps(params)  # parameters must be storable in meta.json
            psnr = peak_signal_noise_ratio(clean, out, data_range=1.0)
            stats[w].append({"psnr": psnr, "contrast_ratio": _contrast(out) / _contrast(clean), **params})
            row.append(out)
        rows.append(np.concatenate(row, 1))
    Image.fromarray(to_uint8(np.concatenate(rows, 0))).save(tmp_path / "weather_grid.png")
    assert (tmp_path / "weather_grid.png").stat().st_size > 10_000

    for w, runs in stats.items():
        for s in runs:
            assert 8 < s["psnr"] < 35, f"{w}: PSNR {s['psnr']:.1f} dB outside the sane band"
    # Haze pulls every pixel towards the airlight: contrast drops clearly.
    assert all(s["contrast_ratio"] < 0.85 for s in stats["rain_haze"])
    assert all(s["mean_transmission"] < 0.9 for s in stats["rain_haze"])
    # Drops and flakes are local: they cover a bounded part of the frame and barely touch contrast.
    for w in ("raindrop", "snow"):
        assert all(0.005 < s["mask_coverage"] < 0.5 for s in stats[w]), w
    assert all(s["contrast_ratio"] > 0.85 for s in stats["raindrop"])


def test_degradation_is_seeded(photos):
    clean = photos[0].astype(np.float32)
    for w in MODELS:
        a, pa = degrade(clean, w, np.random.default_rng(3))
        b, pb = degrade(clean, w, np.random.default_rng(3))
        c, _ = degrade(clean, w, np.random.default_rng(4))
        assert np.array_equal(a, b) and pa == pb
        assert not np.array_equal(a, c)


def test_snow_brightens_and_raindrops_refract(photos):
    clean = photos[1].astype(np.float32)
    snowy, _ = degrade(clean, "snow", np.random.default_rng(0))
    assert snowy.mean() > clean.mean() + 0.02
    drops, params = degrade(clean, "raindrop", np.random.default_rng(0))
    changed = np.abs(drops - clean).max(-1) > 0.05
    # Only pixels under drops change: about the drops' coverage, never the whole frame.
    assert 0.3 * params["mask_coverage"] < changed.mean() < 3 * params["mask_coverage"] + 0.02


def test_unknown_weather_is_an_error(photos):
    with pytest.raises(ValueError, match="unknown weather 'fog'"):
        degrade(photos[0], "fog", np.random.default_rng(0))


def test_severity_scales_the_amount_of_weather(photos):
    clean = photos[1].astype(np.float32)
    for w in MODELS:
        light, lp = degrade(clean, w, np.random.default_rng(5), severity=0.2)
        full, fp = degrade(clean, w, np.random.default_rng(5))
        assert lp["severity"] == 0.2 and fp["severity"] == 1.0
        # the same draws, less of them: a light shower changes the photo less than the storm
        assert peak_signal_noise_ratio(clean, light, data_range=1.0) > peak_signal_noise_ratio(clean, full, data_range=1.0) + 2, w
