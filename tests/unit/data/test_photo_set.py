"""The embedded training set's looks: greyscale, turned, structured and textured crops, each from its own random stream."""

import numpy as np
import pytest
from PIL import Image

from weatherkd.data.check import iter_tar
from weatherkd.data.photo_set import (SynthSpec, _random_crop, add_texture, build, draw_structures, greyscale,
                                      read_builtin)
from weatherkd.data.samples import decode_sample
from weatherkd.data.shards import ShardSetError


def _train_samples(out, **spec):
    build(str(out), "builtin", SynthSpec(train=40, test=1, size=32, test_size=64, weathers=["snow"], **spec))
    return [decode_sample(s) for tar in sorted(out.glob("train-*.tar")) for s in iter_tar(tar)]


def test_grey_crops_are_grey_in_input_and_target_and_the_rest_keep_their_colour(tmp_path):
    samples = _train_samples(tmp_path / "a", grey_fraction=0.5)
    grey = [s for s in samples if "grey" in s["meta"]["crop"]]
    assert 5 <= len(grey) <= 35  # 40 draws at p = 0.5
    for s in grey:
        t = s["target"].astype(int)
        assert np.array_equal(t[..., 0], t[..., 1]) and np.array_equal(t[..., 1], t[..., 2])
    coloured = [s for s in samples if "grey" not in s["meta"]["crop"]]
    assert any(np.abs(s["target"][..., 0].astype(int) - s["target"][..., 2]).max() > 10 for s in coloured)
    # Turned crops say so; a turn of 0 degrees is not recorded.
    turns = [c for s in samples for c in s["meta"]["crop"] if isinstance(c, str) and c.startswith("rot")]
    assert turns and set(turns) <= {"rot90", "rot180", "rot270"}


def test_without_grey_or_turns_the_crops_are_the_ones_of_a_set_built_before_them(tmp_path):
    plain = _train_samples(tmp_path / "plain", grey_fraction=0.0, rotate=False, structure_fraction=0.0,
                           texture_fraction=0.0)
    assert not any(isinstance(c, str) for s in plain for c in s["meta"]["crop"])
    # Grey and turns come from their own random stream: the crops and their weather stay where they were.
    grey = _train_samples(tmp_path / "grey", grey_fraction=1.0, rotate=False, structure_fraction=0.0,
                          texture_fraction=0.0)
    for a, b in zip(plain, grey):
        assert a["meta"]["crop"][:3] == b["meta"]["crop"][:3] and a["meta"]["params"] == b["meta"]["params"]
        # the grey of the crop, up to the rounding of the colour crop to 8 bits
        expected = greyscale(a["target"] / np.float32(255)) * 255
        assert np.abs(b["target"] - expected).max() <= 1.0


def test_greyscale_is_bt601_luma_in_every_channel():
    rgb = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], np.float32)
    g = greyscale(rgb)
    assert np.allclose(g[0, :, 0], np.round(np.array([0.299, 0.587, 0.114]) * 255) / 255)
    assert np.array_equal(g[..., 0], g[..., 2])


def test_structures_are_drawn_into_input_and_target_alike_from_their_own_stream(tmp_path):
    plain = _train_samples(tmp_path / "plain", grey_fraction=0.0, rotate=False, structure_fraction=0.0,
                           clean_fraction=0.5, texture_fraction=0.0)
    drawn = _train_samples(tmp_path / "drawn", grey_fraction=0.0, rotate=False, structure_fraction=1.0,
                           clean_fraction=0.5, texture_fraction=0.0)
    assert all("structures" in s["meta"]["crop"] for s in drawn)
    assert not any("structures" in s["meta"]["crop"] for s in plain)
    for a, b in zip(plain, drawn):
        # The same crop and weather draws; only the scene differs, and only along thin lines.
        assert a["meta"]["crop"][:3] == b["meta"]["crop"][:3] and a["meta"]["params"] == b["meta"]["params"]
        changed = np.abs(a["target"].astype(int) - b["target"]).max(-1) > 8
        assert 0 < changed.mean() < 0.75
        if b["meta"]["params"]["severity"] == 0.0:  # a clean crop's structures stay in its input
            assert np.array_equal(b["input"], b["target"])


def test_structures_on_a_grey_crop_stay_grey(tmp_path):
    samples = _train_samples(tmp_path / "g", grey_fraction=1.0, structure_fraction=1.0)
    for s in samples:
        t = s["target"].astype(int)
        assert np.array_equal(t[..., 0], t[..., 1]) and np.array_equal(t[..., 1], t[..., 2])


def test_draw_structures_draws_thin_opaque_lines():
    flat = np.full((64, 64, 3), 0.5, np.float32)
    for seed in range(20):
        out = draw_structures(flat, np.random.default_rng(seed))
        moved = np.abs(out - flat).max(-1)
        assert 0.005 < (moved > 0.05).mean() < 0.75, seed  # lines, not a wash over the crop
        assert moved.max() > 0.1  # opaque: far from the background where a line lies


def test_texture_is_multiplied_into_input_and_target_alike_from_its_own_stream(tmp_path):
    plain = _train_samples(tmp_path / "plain", grey_fraction=0.5, clean_fraction=0.5, texture_fraction=0.0)
    grained = _train_samples(tmp_path / "grained", grey_fraction=0.5, clean_fraction=0.5, texture_fraction=1.0)
    assert all("texture" in s["meta"]["crop"] for s in grained)
    for a, b in zip(plain, grained):
        # The same crop, look and weather draws; the scene gains a fine grain over most of its pixels.
        assert [c for c in b["meta"]["crop"] if c != "texture"] == a["meta"]["crop"]
        assert a["meta"]["params"] == b["meta"]["params"]
        assert (np.abs(a["target"].astype(int) - b["target"]).max(-1) > 2).mean() > 0.3
        if b["meta"]["params"]["severity"] == 0.0:
            assert np.array_equal(b["input"], b["target"])
        else:  # the weather falls on the grained scene
            assert not np.array_equal(a["input"], b["input"])
        if "grey" in b["meta"]["crop"]:
            assert np.array_equal(b["target"][..., 0], b["target"][..., 2])


def test_add_texture_is_a_fine_grain_that_keeps_the_brightness():
    flat = np.full((96, 96, 3), 0.5, np.float32)
    for seed in range(10):
        out = add_texture(flat, np.random.default_rng(seed))
        relative = out[..., 0] / 0.5 - 1
        assert abs(relative.mean()) < 0.02, seed  # scales around 1: no shift of the brightness
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
        # fine: neighbours four pixels apart are nearly independent
        assert abs(np.corrcoef(relative[:, :-4].ravel(), relative[:, 4:].ravel())[0, 1]) < 0.25, seed
    assert np.array_equal(add_texture(np.full((1, 1, 3), 0.5, np.float32), np.random.default_rng(0)),
                          np.full((1, 1, 3), 0.5, np.float32))  # nothing to grain


def test_a_crop_is_the_window_of_the_whole_photo_resized():
    """Only the crop's window is resampled; the pixels are those of resizing the whole photo, then
    cropping. The default scale is drawn as every set before `--zoom` drew it: uniform on 0.25-0.75."""
    (_, photo), = read_builtin(["path"])
    img = Image.fromarray((photo * 255 + 0.5).astype(np.uint8))
    for seed in range(5):
        crop, (y, x, scale) = _random_crop(np.random.default_rng(seed), img, 64, SynthSpec().zoom)
        rng = np.random.default_rng(seed)
        lo = 64 / min(img.size)
        exact = float(rng.uniform(max(lo, 0.25), max(lo, 0.75)))
        whole = img.resize((round(img.width * exact), round(img.height * exact)), Image.BICUBIC)
        expected = np.asarray(whole, np.float32)[y:y + 64, x:x + 64]
        assert crop.shape == (64, 64, 3) and abs(exact - scale) < 1e-4
        assert np.abs(crop * 255 - expected).max() <= 1.01


def test_zoom_sets_the_scale_of_training_crops_and_a_bad_range_is_refused(tmp_path):
    (_, photo), = read_builtin(["path"])
    img = Image.fromarray((photo * 255 + 0.5).astype(np.uint8))
    scales = [_random_crop(np.random.default_rng(s), img, 64, (0.4, 0.5))[1][2] for s in range(20)]
    assert all(0.4 <= s <= 0.5 for s in scales) and max(scales) - min(scales) > 0.02
    # never so small that the crop would not fit: the photo's short side times the scale is at least the crop
    assert _random_crop(np.random.default_rng(0), img, 64, (0.01, 0.01))[1][2] == pytest.approx(64 / min(img.size), abs=1e-4)
    with pytest.raises(ShardSetError, match="--zoom needs 0 < low <= high"):
        build(str(tmp_path / "s"), "builtin", SynthSpec(zoom=[0.5, 0.2]))
