"""The non-finite guard and the resume config check, in process (their launches are in test_faults)."""

import pytest
import torch

from weatherkd.engine import run_config
from weatherkd.engine.nonfinite import NonFiniteGuard, NonFiniteTraining, held_weights, weights_finite


def test_the_guard_flags_skips_counts_and_names_the_first_bad_step():
    guard = NonFiniteGuard(torch.device("cpu"), allowed=1, num_processes=1)
    finite, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    assert guard.observe({"gt": finite, "loss": finite}, torch.tensor(3.0), step=1).item() == 0
    assert guard.observe({"gt": finite, "loss": finite}, torch.tensor(float("inf")), step=2).item() == 1
    guard.check("at step 2")  # one skipped step is allowed
    state = guard.state_dict()
    assert guard.observe({"gt": nan, "loss": nan}, None, step=3).item() == 1
    with pytest.raises(NonFiniteTraining, match=r"^step 2: training went non-finite \(grad_norm, gt, loss\); 2 step"):
        guard.check("before the export")
    guard.load_state_dict(state)  # a resume restores the count and the first bad step
    assert guard.skipped.item() == 1 and guard.first.item() == 2


def test_weights_finite_sees_any_non_finite_element():
    assert weights_finite([torch.ones(3), torch.arange(3)], torch.device("cpu"), 1)
    assert not weights_finite([torch.ones(3), torch.tensor([0.0, float("inf")])], torch.device("cpu"), 1)


def test_only_keys_that_extend_or_watch_a_run_pass_a_resume():
    saved = {"seed": 0, "train": {"lr": 1e-3, "max_steps": 10, "log_every": 5}, "ckpt": {"every": 5},
             "model": {"arch": "unet_bn", "kwargs": {"width": 8}}}
    now = {"seed": 0, "train": {"lr": 1e-3, "max_steps": 20, "log_every": 1}, "ckpt": {"every": 2},
           "model": {"arch": "unet_bn", "kwargs": {"width": 16}}}
    diff = run_config.changes(saved, now)
    assert diff == {"ckpt.every": (5, 2), "model.kwargs": ({"width": 8}, {"width": 16}),
                    "train.log_every": (5, 1), "train.max_steps": (10, 20)}
    assert run_config.defining(diff) == ["model.kwargs"]


def test_a_zero3_partitions_padding_is_not_checked():
    """DeepSpeed rounds a ZeRO-3 partition up to equal sizes and leaves the last one's padding
    uninitialised: garbage there must not stop the run, a NaN in the weights must."""
    param = torch.empty(0)  # ZeRO-3 empties the parameter itself
    param.ds_numel = 5  # 5 weights over 2 ranks: partitions of 3, the last with 1 of padding
    first, last = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, float("nan")])
    first.ds_numel = last.ds_numel = 3
    param.ds_tensor = last
    assert torch.equal(held_weights(param, rank=1), torch.tensor([4.0, 5.0]))
    assert weights_finite([held_weights(param, rank=1)], torch.device("cpu"), 1)
    param.ds_tensor = first
    first[1] = float("nan")
    assert not weights_finite([held_weights(param, rank=0)], torch.device("cpu"), 1)
    plain = torch.ones(4)
    assert held_weights(plain, rank=1) is plain


def test_a_key_added_since_the_checkpoint_is_no_change_at_its_default():
    """A distill run saved before `consistency.ops` existed resumes as it was; one that sets it
    otherwise changes what the run is; a config with a key since removed compares as saved."""
    from weatherkd import config as cfgmod
    from weatherkd.recipes.distill import Config

    now = cfgmod.load(Config, "configs/distill/demo.yaml")
    saved = cfgmod.to_dict(now)
    del saved["consistency"]["ops"]
    assert run_config.changes(run_config.with_defaults(Config, saved), cfgmod.to_dict(now)) == {}
    flips = cfgmod.load(Config, "configs/distill/demo.yaml", ["consistency.ops=[flip_rows]"])
    diff = run_config.changes(run_config.with_defaults(Config, saved), cfgmod.to_dict(flips))
    assert run_config.defining(diff) == ["consistency.ops"]
    saved["gone"] = 1
    assert run_config.with_defaults(Config, saved) is saved
