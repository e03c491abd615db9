"""Reading users' image files at full fidelity: orientation, alpha, grayscale, palette, 16 bits."""

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from weatherkd.data import image_files
from weatherkd.data.samples import BadImage


def pattern(h=20, w=30, c=3, dtype=np.uint8):
    top = np.iinfo(dtype).max
    rng = np.random.default_rng(0)
    return rng.integers(0, top + 1, size=(h, w, c), dtype=np.int64).astype(dtype)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(tmp_path, orientation):
    path = tmp_path / "o.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pattern()).save(path, exif=exif)  # lossless, so pixels compare exactly
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    got = image_files.read(path)
    if orientation > 1:  # the tag really is in the file: PIL turns it too
        assert expected.shape != pattern().shape or not np.array_equal(expected, pattern())
    assert np.array_equal(image_files.quantize(got.rgb, 8), expected)


def test_sixteen_bits_survive_a_round_trip(tmp_path):
    for channels in (3, 4, 1):
        deep = pattern(c=channels, dtype=np.uint16)
        photo = image_files.Photo(deep[..., :min(channels, 3)].astype(np.float32).repeat(3 if channels == 1 else 1, -1)
                                  / 65535, deep[..., 3] if channels == 4 else None, 16, channels == 1)
        data, lost = image_files.encode(photo, "png")
        (tmp_path / "d.png").write_bytes(data)
        back = image_files.read(tmp_path / "d.png")
        assert back.bits == 16 and not lost and back.gray == (channels == 1)
        assert np.array_equal(image_files.quantize(back.rgb[..., :1] if channels == 1 else back.rgb, 16),
                              deep[..., :1] if channels == 1 else deep[..., :3])
        if channels == 4:
            assert back.alpha.dtype == np.uint16 and np.array_equal(back.alpha, deep[..., 3])
    tifffile.imwrite(tmp_path / "d.tif", pattern(dtype=np.uint16))
    t = image_files.read(tmp_path / "d.tif")
    assert t.bits == 16 and np.array_equal(image_files.quantize(t.rgb, 16), pattern(dtype=np.uint16))
    data, lost = image_files.encode(t, "jpg")
    assert lost == ["jpg holds 8 bits per channel, not 16"]


def test_alpha_gray_and_palette(tmp_path):
    rgba = pattern(c=4)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = image_files.read(tmp_path / "a.png")
    assert np.array_equal(a.alpha, rgba[..., 3]) and a.rgb.shape == (20, 30, 3)
    Image.fromarray(pattern(c=1)[..., 0], "L").save(tmp_path / "g.bmp")
    g = image_files.read(tmp_path / "g.bmp")
    assert g.gray and g.alpha is None and np.array_equal(g.rgb[..., 0], g.rgb[..., 2])
    data, _ = image_files.encode(g, "png")
    (tmp_path / "g.png").write_bytes(data)
    assert Image.open(tmp_path / "g.png").mode == "L"
    pal = Image.fromarray(pattern()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    p = image_files.read(tmp_path / "p.png")
    assert p.alpha is not None and p.alpha.min() == 0 and p.alpha.max() == 255
    for fmt in ("jpg", "webp"):
        data, lost = image_files.encode(a, fmt, 90)
        assert data and (lost == ["jpg has no alpha channel"] if fmt == "jpg" else not lost)


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "t.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (tmp_path / "n.tif").write_bytes(b"II*\x00garbage")
    for name in ("t.jpg", "n.tif", "missing.png"):
        with pytest.raises(BadImage, match=name):
            image_files.read(tmp_path / name)
