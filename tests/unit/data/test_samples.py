"""Sample encodings: lossless both ways, recorded in the manifest, and every set loads the same batches."""

import json

import numpy as np
import pytest
import torch

from conftest import make_set

from weatherkd.data import check
from weatherkd.data.samples import CorruptSample, decode_sample, encode_sample, image_member
from weatherkd.data.shards import ShardSetWriter, open_set
from weatherkd.data.stream import TrainSpec, train_loader


@pytest.mark.parametrize("encoding", ["png", "qoi"])
def test_every_encoding_is_lossless(encoding):
    rng = np.random.default_rng(0)
    images = {f: rng.integers(0, 256, (37, 53, 3), dtype=np.uint8) for f in ("input", "target", "teacher")}
    raw = encode_sample("k", images["input"], 2, {"a": 1}, target=images["target"], teacher=images["teacher"],
                        encoding=encoding)
    assert {f"{f}.{encoding}" for f in images} <= set(raw) and image_member(raw, "teacher") == f"teacher.{encoding}"
    sample = decode_sample(raw)
    for f, img in images.items():
        assert sample[f].dtype == np.uint8 and np.array_equal(sample[f], img), f
    assert sample["weather"] == 2 and sample["meta"] == {"a": 1}


def _batches(path, n=3):
    loader = train_loader(path, "train", None, TrainSpec(crop=8, batch_size=4, shuffle_buffer=4), seed=1, rank=0,
                          world_size=1, batches_per_epoch=n, num_workers=0)
    return list(loader.epoch(0))


def test_a_qoi_set_records_its_encoding_and_loads_the_png_sets_batches(tmp_path):
    counts = {("train", "snow"): 6, ("train", "raindrop"): 5, ("test", "snow"): 2}
    make_set(tmp_path / "png", counts, size=16, encoding="png")
    make_set(tmp_path / "qoi", counts, size=16, encoding="qoi")
    assert open_set(tmp_path / "qoi").encoding == "qoi" and open_set(tmp_path / "png").encoding == "png"
    for a, b in zip(_batches(tmp_path / "png"), _batches(tmp_path / "qoi"), strict=True):
        assert a["key"] == b["key"] and all(torch.equal(a[f], b[f]) for f in ("input", "target", "weather"))
    summary, problems = check.inspect(tmp_path / "qoi")
    assert not problems, problems
    leaks = check.leakage(tmp_path / "qoi", tmp_path / "png")  # the same random images: every target leaks
    assert len(leaks) == sum(counts.values())

    # A set written before manifests named their encoding is PNG, and still loads.
    manifest = json.loads((tmp_path / "png" / "manifest.json").read_text())
    del manifest["encoding"]
    (tmp_path / "png" / "manifest.json").write_text(json.dumps(manifest))
    assert open_set(tmp_path / "png").encoding == "png" and len(_batches(tmp_path / "png")) == 3


def test_a_set_has_one_encoding(tmp_path):
    writer = ShardSetWriter(tmp_path / "mixed", ["snow"])
    img = np.zeros((8, 8, 3), np.uint8)
    writer.add("train", "snow", encode_sample("a", img, 0, {}, encoding="qoi"))
    with pytest.raises(ValueError, match="one encoding: sample 'b' is png, the set qoi"):
        writer.add("train", "snow", encode_sample("b", img, 0, {}, encoding="png"))


def test_a_truncated_qoi_member_is_a_corrupt_sample():
    raw = encode_sample("k", np.zeros((9, 9, 3), np.uint8), 0, {}, encoding="qoi")
    raw["input.qoi"] = raw["input.qoi"][:-12]
    with pytest.raises(CorruptSample, match="member 'input.qoi'"):
        decode_sample(raw)
