"""Checkpoint files, in process: the engine's state as JSON + safetensors, manifests, fallback,
and loading that cannot run code."""

import json
import os
import pickle

import pytest
import torch

from weatherkd.engine import checkpoint


def test_engine_state_round_trips_without_pickle(tmp_path):
    gen = torch.Generator().manual_seed(3)
    state = {"progress": {"step": 7, "micro": 14}, "scheduler": {"base_lrs": [0.1], "lr_lambdas": [None]},
             "recipe": {"history": {"w": torch.arange(6.0).view(2, 3)}, "generator": gen.get_state(), "n": 2},
             "ema": None, "flags": [True, 1.5, "x"]}
    checkpoint.save_state_tree(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine_state.json", "engine_state.safetensors"]
    back = checkpoint.load_state_tree(tmp_path)
    assert back["progress"] == state["progress"] and back["scheduler"] == state["scheduler"]
    assert torch.equal(back["recipe"]["history"]["w"], state["recipe"]["history"]["w"])
    assert torch.equal(back["recipe"]["generator"], gen.get_state()) and back["flags"] == [True, 1.5, "x"]
    with pytest.raises(TypeError, match="only tensors and plain data"):
        checkpoint.save_state_tree({"bad": object()}, tmp_path)


def _fake_checkpoint(root, step: int):
    d = root / checkpoint.step_dir_name(step)
    d.mkdir(parents=True)
    torch.save({"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}, d / "optimizer.bin")
    checkpoint.save_state_tree({"progress": {"step": step}}, d)
    checkpoint.write_manifest(d, step, world_size=1)
    return d


def test_the_newest_checkpoint_that_verifies_is_chosen(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    assert checkpoint.choose("auto", root) is None  # nothing yet: a fresh start
    old, new = _fake_checkpoint(root, 2), _fake_checkpoint(root, 4)
    assert checkpoint.verify(new) is None and checkpoint.choose("auto", root) == new
    data = (new / "optimizer.bin").read_bytes()
    (new / "optimizer.bin").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert checkpoint.verify(new) == "optimizer.bin does not match its sha256"
    assert checkpoint.choose("auto", root) == old and "step-0000004 does not verify" in caplog.text
    (new / checkpoint.MANIFEST).unlink()  # a write killed before its manifest
    assert "no MANIFEST.json" in checkpoint.verify(new)
    (old / "engine_state.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="engine_state.json is missing"):
        checkpoint.choose("auto", root)
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint directory"):
        checkpoint.choose(str(tmp_path / "nowhere"), root)


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _fake_checkpoint(root, step)
    (root / ".step-0000008.tmp").mkdir()  # a killed write
    checkpoint._rotate(root, keep=1, current=root / "step-0000006")
    assert sorted(p.name for p in root.iterdir()) == ["step-0000006"]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_code_is_refused_before_and_during_loading(tmp_path):
    d = _fake_checkpoint(tmp_path, 2)
    checkpoint.refuse_pickled_code(d)  # tensors, numbers, containers: fine
    torch.save({"rng": __import__("numpy").random.get_state()}, d / "random_states_0.pkl")
    checkpoint.refuse_pickled_code(d)  # numpy's generator state (accelerate's RNG files): fine
    marker = tmp_path / "PWNED"
    torch.save({"x": _Payload(marker)}, d / "scheduler.bin")
    with pytest.raises(checkpoint.CheckpointError, match="scheduler.bin holds pickled posix.system"):
        checkpoint.refuse_pickled_code(d)
    with checkpoint.weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(d / "scheduler.bin", weights_only=False)  # what DeepSpeed's checkpoint engine asks for
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # scoped to the block
    (d / "scheduler.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(checkpoint.CheckpointError, match="not a torch archive"):
        checkpoint.refuse_pickled_code(d)
    assert not marker.exists()
    assert json.loads((d / checkpoint.MANIFEST).read_text())["files"]["optimizer.bin"]["bytes"] > 0


def test_a_replacement_killed_between_its_renames_keeps_the_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    d = _fake_checkpoint(root, 4)
    d.rename(root / ".step-0000004.old")  # the old copy moved aside, the new one never got its name
    (root / ".step-0000004.tmp").mkdir()
    (root / "step-0000004.bak").mkdir()  # not ours: ignored, never parsed as a step
    assert checkpoint.choose("auto", root) == d and checkpoint.verify(d) is None
