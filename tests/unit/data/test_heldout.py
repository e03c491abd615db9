"""The held-out check's set: other photos, and a weather generator that shares nothing with training's."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from weatherkd.data import heldout
from weatherkd.data.check import iter_tar
from weatherkd.data.photo_set import BUILTIN_TEST_PHOTOS, builtin_train_photos
from weatherkd.data.samples import decode_sample
from weatherkd.data.shards import MANIFEST, ShardSetError


def test_the_generator_imports_nothing_of_the_training_generator():
    tree = ast.parse(Path(heldout.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "weatherkd.data.weather" not in imported and not any("weather_models" in str(m) for m in imported)
    assert set(heldout.OTHER_PHOTOS).isdisjoint([*builtin_train_photos(), *BUILTIN_TEST_PHOTOS])


@pytest.fixture(scope="module")
def heldout_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout") / "set"
    # 128 px, not less: drop counts scale with the area and never fall below one, so at 96 px both
    # levels draw one or two drops, and which level reads as milder depends on where they land.
    heldout.build(str(out), "builtin-other", heldout.HeldoutSpec(views=1, size=128))
    return out


def test_every_weather_and_level_of_every_other_photo(heldout_set):
    manifest = json.loads((heldout_set / MANIFEST).read_text())
    per_weather = len(heldout.OTHER_PHOTOS) * len(heldout.LEVELS)
    assert manifest["splits"] == {"test": {w: per_weather for w in heldout.GENERATORS}}
    assert manifest["has_target"] == {"test": True}
    psnr = {(w, lv): [] for w in heldout.GENERATORS for lv in heldout.LEVELS}
    for tar in sorted(heldout_set.glob("test-*.tar")):
        for raw in iter_tar(tar):
            s = decode_sample(raw)
            assert s["meta"]["origin"] in heldout.OTHER_PHOTOS and max(s["input"].shape) <= 128
            assert s["input"].shape == s["target"].shape and not np.array_equal(s["input"], s["target"])
            psnr[s["meta"]["weather"], s["meta"]["level"]].append(peak_signal_noise_ratio(s["target"], s["input"]))
    for w in heldout.GENERATORS:  # mild is milder, and still weather (not a copy of the photo)
        assert np.mean(psnr[w, "mild"]) > np.mean(psnr[w, "moderate"]) > 15, (w, psnr)


def test_rebuilt_bit_for_bit_and_bad_requests_refused(heldout_set, tmp_path):
    again = tmp_path / "again"
    heldout.build(str(again), "builtin-other", heldout.HeldoutSpec(views=1, size=128))
    sums = [[s["sha256"] for s in json.loads((d / MANIFEST).read_text())["shards"]] for d in (heldout_set, again)]
    assert sums[0] == sums[1]
    with pytest.raises(ShardSetError, match="training set"):
        heldout.build(str(tmp_path / "x"), "builtin", heldout.HeldoutSpec())
    with pytest.raises(ShardSetError, match="--levels"):
        heldout.build(str(tmp_path / "x"), "builtin-other", heldout.HeldoutSpec(levels=["heavy"]))
