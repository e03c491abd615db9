"""`weatherkd plan`: activation bytes measured from what autograd saves, model states as DeepSpeed counts them."""

import json
import subprocess
import sys

import torch
from torch import nn

from weatherkd.commands import plan


def test_saved_activations_are_counted_once_per_storage_and_scale_with_batch():
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    # linear 1 saves its input; ReLU saves its output, which linear 2 saves too: one storage.
    for batch in (1, 4):
        x = torch.rand(batch, 256)
        assert plan.saved_activation_bytes(lambda: net(x), params) == 2 * batch * 256 * 4
    with torch.no_grad():
        assert plan.saved_activation_bytes(lambda: net(torch.rand(1, 256)), params) == 0


def test_under_autocast_weight_copies_are_a_fixed_cost_not_a_per_sample_one():
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    per_sample, fixed = plan.activation_bytes(net, params, (256,), torch.bfloat16)
    assert per_sample == 2 * 256 * 2  # the bf16 input and ReLU output, per sample
    assert fixed == 256 * 256 * 2  # linear 2's bf16 weight copy, whatever the batch (linear 1 needs no input grad)
    assert plan.activation_bytes(net, params, (256,)) == (2 * 256 * 4, 0)


def test_model_states_follow_deepspeeds_bytes_per_parameter():
    p, n = 10_000_000, 8
    states = plan.model_state_bytes(p, n, 1, largest_layer=1_000_000)
    assert states["ddp"] == 20 * p and states["zero2"] == 2 * p + 18 * p // n
    assert states["zero3"] == 4 * 1_000_000 + 18 * p // n
    assert states["ddp"] > states["zero1"] > states["zero2"] > states["zero3"]


def test_plan_command_prints_json_for_a_real_size_student():
    proc = subprocess.run([sys.executable, "-m", "weatherkd", "plan", "--config",
                           "configs/distill/allweather-student-medium.yaml", "--launch", "launch/gpu-zero2.yaml",
                           "--gpu-mem", "80", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["launch_strategy"] == "zero2" and out["gpus"] == 8 and out["crop"] == 256
    assert 3.0e6 < out["trained_params"] < 4.0e6 and out["activation_gb_per_sample"] > 0
    rows = out["strategies"]
    assert rows["zero3"]["max_micro_batch"] >= rows["ddp"]["max_micro_batch"] > out["micro_batch"]
    assert any("teacher" in n and "not exported yet" in n for n in out["notes"])
    bad = subprocess.run([sys.executable, "-m", "weatherkd", "plan", "--config", "configs/dream/allweather.yaml"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: plan: configs/dream/allweather.yaml is not a config of a stage it plans")
    missing = subprocess.run([sys.executable, "-m", "weatherkd", "plan", "--config", "configs/vq/nope.yaml"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and missing.stderr == "error: config file not found: configs/vq/nope.yaml\n"


def test_dckd_bf16_negatives_count_their_copies():
    """``dckd.frozen_precision: bf16`` makes a bf16 copy of the history model (and of the VQ, once
    exported) beside the fp32 ones: the plan counts it, 2 bytes a parameter."""
    from weatherkd import config as C
    from weatherkd import cost
    from weatherkd.commands.plan import planned_models
    from weatherkd.recipes.distill import Config

    for precision, want in (("train", False), ("bf16", True)):
        cfg = C.load(Config, "configs/distill/demo.yaml", ["objective=dckd", f"dckd.frozen_precision={precision}",
                                                            "teacher=", "vq="])
        planned = planned_models("distill", cfg)
        n = cost.params(planned.trained)
        assert planned.of_role("averaged")["history model"] == n
        assert {k: c.params for k, c in planned.copies.items()} == ({"history model": n} if want else {})
        assert all(c.dtype == torch.bfloat16 for c in planned.copies.values())
