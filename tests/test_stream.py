"""Streaming loaders under a real 2-process `accelerate launch`, 2 workers per rank."""

import io
import tarfile
from pathlib import Path

from conftest import PROCS, accelerate_launch, make_set, read_rank_reports


def corrupt_member(tar_path: Path, member_name: str) -> None:
    """Rewrite ``tar_path`` with ``member_name``'s bytes replaced by garbage (a truncated PNG)."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == member_name:
                data = data[:40]
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_eval_sees_every_key_exactly_once(tmp_path):
    # 3, 4 and 5 shards with uneven counts, over 2 ranks x 2 workers = 4 slots.
    sets = {
        3: make_set(tmp_path / "s3", {("test", "snow"): 7}, shard_size=3),  # 3,3,1
        4: make_set(tmp_path / "s4", {("test", "snow"): 5, ("test", "raindrop"): 4}, shard_size=3),  # 3,2 / 3,1
        5: make_set(tmp_path / "s5", {("test", "snow"): 13}, shard_size=3),  # 3,3,3,3,1
    }
    for n, manifest in sets.items():
        assert len(manifest["shards"]) == n
    dirs = [tmp_path / f"s{n}" for n in sets]
    accelerate_launch([PROCS / "stream_probe.py", "eval", tmp_path, *dirs])
    reports = read_rank_reports(tmp_path)
    for d, manifest in zip(dirs, sets.values()):
        expected = sorted(f"test_{w}_{i:04d}" for w, c in manifest["splits"]["test"].items() for i in range(c))
        per_rank = [r[str(d)] for r in reports]
        seen = sorted(k for r in per_rank for k in r["valid_keys"])
        assert seen == expected, f"{d}: keys seen {seen}"
        # Equal forward counts on every rank, as ZeRO-3 needs.
        assert per_rank[0]["batches"] == per_rank[1]["batches"] == per_rank[0]["len"]


def test_train_gives_equal_batches_per_rank_with_uneven_shards(tmp_path):
    make_set(tmp_path / "uneven", {("train", "snow"): 7, ("train", "rain_haze"): 2}, shard_size=3)  # 3 shards
    accelerate_launch([PROCS / "stream_probe.py", "train", tmp_path, tmp_path / "uneven"])
    r0, r1 = (r[str(tmp_path / "uneven")] for r in read_rank_reports(tmp_path))
    for r in (r0, r1):
        assert [len(e) for e in r["epochs"]] == [7, 7, 7]
        assert r["shapes"] == [4, 3, 8, 8]
        # A resume into the middle of an epoch replays exactly the batches that were left.
        assert r["replay_from_3"] == r["epochs"][0][3:]
        # The engine's one unending stream gives the same batches across the epoch boundary.
        assert r["continuous_from_3"] == r["epochs"][0][3:] + r["epochs"][1] + r["epochs"][2][:2]
    assert r0["epochs"][0] != r1["epochs"][0], "ranks must draw different samples"
    assert r0["epochs"][0] != r0["epochs"][1], "epochs must differ"


def test_corrupt_member_is_skipped_and_counted(tmp_path):
    make_set(tmp_path / "bad", {("train", "snow"): 6, ("test", "snow"): 6}, shard_size=6)
    corrupt_member(tmp_path / "bad" / "train-snow-000000.tar", "train_snow_0002.input.png")
    corrupt_member(tmp_path / "bad" / "test-snow-000000.tar", "test_snow_0004.target.png")
    accelerate_launch([PROCS / "stream_probe.py", "train", tmp_path, tmp_path / "bad"])
    train = [r[str(tmp_path / "bad")] for r in read_rank_reports(tmp_path)]
    for r in train:
        assert r["corrupt"] > 0
        assert all("train_snow_0002" not in batch for epoch in r["epochs"] for batch in epoch)
    accelerate_launch([PROCS / "stream_probe.py", "eval", tmp_path, tmp_path / "bad"])
    evals = [r[str(tmp_path / "bad")] for r in read_rank_reports(tmp_path)]
    assert sum(r["corrupt"] for r in evals) == 1
    seen = sorted(k for r in evals for k in r["valid_keys"])
    assert seen == [f"test_snow_{i:04d}" for i in range(6) if i != 4]
    assert evals[0]["batches"] == evals[1]["batches"]
