"""Building, checking and ingesting shard sets through the real CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import make_set, run_cli, refused
from test_stream import corrupt_member

from weatherkd.data.check import iter_tar
from weatherkd.data.samples import decode_sample
from weatherkd.data.shards import MANIFEST, ShardSetError, ShardSetWriter, open_set


def test_synth_builds_a_paired_set_with_disjoint_photos(builtin_set):
    manifest = json.loads((builtin_set / MANIFEST).read_text())
    assert manifest["splits"]["train"] == {"rain_haze": 16, "raindrop": 16, "snow": 16}
    assert manifest["splits"]["test"] == {"rain_haze": 2, "raindrop": 2, "snow": 2}
    created = manifest["created_by"]
    assert set(created["train_photos"]).isdisjoint(created["test_photos"])
    assert manifest["version"] and all(len(s["sha256"]) == 64 for s in manifest["shards"])
    train = [decode_sample(s) for s in iter_tar(builtin_set / "train-snow-000000.tar")]
    sample = next(s for s in train if s["meta"]["params"]["severity"] > 0)
    assert sample["input"].shape == sample["target"].shape == (48, 48, 3)
    assert sample["meta"]["weather"] == "snow" and "veil" in sample["meta"]["params"]
    assert sample["meta"]["origin"] in created["train_photos"]
    assert all(0.2 <= s["meta"]["params"]["severity"] <= 1 or s["meta"]["params"] == {"severity": 0.0} for s in train)
    # the clean crops are clean: input = target, bit for bit
    assert all(np.array_equal(s["input"], s["target"]) == (s["meta"]["params"]["severity"] == 0) for s in train)
    test = decode_sample(next(iter_tar(builtin_set / "test-snow-000000.tar")))
    assert test["meta"]["origin"] in created["test_photos"] and max(test["input"].shape) <= 96
    assert test["meta"]["params"]["severity"] == 1.0  # the test split keeps the full-strength protocol
    # Every training crop is degraded by every weather: the same target appears once per weather.
    targets = {w: decode_sample(next(iter_tar(builtin_set / f"train-{w}-000000.tar")))["target"]
               for w in manifest["weathers"]}
    assert all(np.array_equal(targets["snow"], t) for t in targets.values())


def test_synth_is_reproducible_and_refuses_to_overwrite(builtin_set, tmp_path):
    again = tmp_path / "again"
    run_cli("shards", "synth", "--out", again, "--train", 16, "--test", 2, "--size", 48, "--test-size", 96)
    a = json.loads((builtin_set / MANIFEST).read_text())["shards"]
    b = json.loads((again / MANIFEST).read_text())["shards"]
    assert [s["sha256"] for s in a] == [s["sha256"] for s in b]
    proc = refused("shards", "synth", "--out", again, "--train", 4)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr
    run_cli("shards", "synth", "--out", again, "--train", 4, "--test", 1, "--size", 32, "--overwrite")
    assert json.loads((again / MANIFEST).read_text())["splits"]["train"]["snow"] == 4
    assert len(list(again.glob("train-*.tar"))) == 3  # stale shards from the first build are gone


def test_inspect_passes_a_good_set_and_names_corruption(builtin_set, tmp_path):
    proc = run_cli("shards", "inspect", builtin_set)
    report = json.loads(proc.stdout)
    assert report["ok"] and report["splits"]["train"] == {"rain_haze": 16, "raindrop": 16, "snow": 16}

    bad = tmp_path / "bad"
    make_set(bad, {("train", "snow"): 4}, shard_size=4)
    corrupt_member(bad / "train-snow-000000.tar", "train_snow_0001.target.png")
    proc = refused("shards", "inspect", bad)
    assert proc.returncode == 1
    assert "train-snow-000000.tar: sha256 does not match" in proc.stderr
    assert "train-snow-000000.tar: sample 'train_snow_0001' does not decode" in proc.stderr


def test_killed_writer_leaves_an_incomplete_set_that_loaders_refuse(tmp_path):
    writer = ShardSetWriter(tmp_path / "half", ["snow"], shard_size=2)
    rng = np.random.default_rng(0)
    from weatherkd.data.samples import encode_sample

    for i in range(3):  # one complete shard, one open temp file, then "killed": no close()
        writer.add("train", "snow", encode_sample(f"k{i}", rng.integers(0, 255, (8, 8, 3), np.uint8), 0, {}))
    assert sorted(p.name for p in (tmp_path / "half").iterdir() if not p.name.startswith(".")) == [
        "train-snow-000000.tar"]
    with pytest.raises(ShardSetError, match="no manifest.json"):
        open_set(tmp_path / "half")
    proc = refused("shards", "inspect", tmp_path / "half")
    assert proc.returncode == 1 and "writer was killed" in proc.stderr
    # A missing shard listed in a manifest is named.
    make_set(tmp_path / "gone", {("train", "snow"): 4}, shard_size=2)
    (tmp_path / "gone" / "train-snow-000001.tar").unlink()
    with pytest.raises(ShardSetError, match="train-snow-000001.tar' listed in the manifest is missing"):
        open_set(tmp_path / "gone")


def _allweather_tree(root, sizes):
    """A miniature AllWeather layout: {set}/{input,gt}/ plus a list file of input paths."""
    rng = np.random.default_rng(0)
    lines = []
    for sub, (h, w) in sizes.items():
        for kind in ("input", "gt"):
            (root / sub / kind).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            name = f"im_{i:04d}.png"
            for kind in ("input", "gt"):
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / sub / kind / name)
            lines.append(f"{sub}/input/{name}")
    (root / "allweather.txt").write_text("\n".join(lines) + "\n")
    return lines


def test_ingest_allweather_layout(tmp_path):
    root = tmp_path / "allweather"
    _allweather_tree(root, {"snow100k": (20, 30), "raindrop": (16, 16), "test1": (24, 18)})
    run_cli("shards", "ingest", "--layout", "allweather", "--root", root, "--list", root / "allweather.txt",
            "--out", tmp_path / "ingested", "--split", "test")
    shard_set = open_set(tmp_path / "ingested", "test")
    assert shard_set.manifest["splits"]["test"] == {"rain_haze": 2, "raindrop": 2, "snow": 2}
    samples = [decode_sample(r) for s in shard_set.shards("test") for r in iter_tar(shard_set.dir / s["file"])]
    by_origin = {s["meta"]["origin"]: s for s in samples}
    snow = by_origin["snow100k/input/im_0001.png"]
    assert snow["input"].shape == (20, 30, 3)  # any size, stored as it is
    assert np.array_equal(snow["target"], np.asarray(Image.open(root / "snow100k/gt/im_0001.png")))
    assert shard_set.weathers[snow["weather"]] == "snow"

    (root / "raindrop/gt/im_0000.png").unlink()
    proc = run_cli("shards", "ingest", "--layout", "allweather", "--root", root, "--list",
                   root / "allweather.txt", "--out", tmp_path / "strict", check=False)
    assert proc.returncode == 1 and "raindrop/gt/im_0000.png" in proc.stderr
    proc = run_cli("shards", "ingest", "--layout", "allweather", "--root", root, "--list",
                   root / "allweather.txt", "--out", tmp_path / "lenient", "--skip-missing")
    manifest = json.loads((tmp_path / "lenient" / MANIFEST).read_text())
    assert manifest["created_by"]["skipped_missing"] == 1
    assert sum(manifest["splits"]["train"].values()) == 5


def test_ingest_paired_folders(tmp_path):
    rng = np.random.default_rng(1)
    for kind in ("input", "gt"):
        (tmp_path / "pairs" / kind).mkdir(parents=True)
    for i in range(3):
        for kind in ("input", "gt"):
            Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(
                tmp_path / "pairs" / kind / f"p{i}.png")
    run_cli("shards", "ingest", "--layout", "paired", "--root", tmp_path / "pairs" / "input",
            "--out", tmp_path / "out", "--weather", "snow")
    assert open_set(tmp_path / "out", "train").count("train") == 3


def test_leakage_finds_resized_recompressed_duplicates(builtin_set, tmp_path):
    proc = refused("shards", "leakage", builtin_set, builtin_set)
    assert proc.returncode == 1  # a set against itself leaks everything

    # A test set of unrelated images does not leak ...
    make_set(tmp_path / "other", {("test", "snow"): 3}, size=32, seed=7)
    assert refused("shards", "leakage", builtin_set, tmp_path / "other").returncode == 0

    # ... but a train image, downscaled and JPEG-recompressed into the test set, is found.
    train = decode_sample(next(iter_tar(builtin_set / "train-snow-000000.tar")))
    small = Image.fromarray(train["target"]).resize((40, 40), Image.BICUBIC)
    jpeg = tmp_path / "leak.jpg"
    small.save(jpeg, quality=70)
    leaked = np.asarray(Image.open(jpeg).convert("RGB"))
    from weatherkd.data.samples import encode_sample

    writer = ShardSetWriter(tmp_path / "leaky", ["snow"])
    writer.add("test", "snow", encode_sample("leaked", leaked, 0, {}, target=leaked))
    writer.close()
    proc = refused("shards", "leakage", builtin_set, tmp_path / "leaky")
    assert proc.returncode == 1
    pairs = json.loads(proc.stdout)["pairs"]
    # The same clean crop is stored once per weather; the report names its first copy.
    crop_index = train["__key__"].rsplit("_", 1)[1]
    assert any(p["train"].endswith(crop_index) and p["test"].endswith(":leaked") for p in pairs), pairs
