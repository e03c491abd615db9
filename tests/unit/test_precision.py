"""`precision.Precision`: each helper's dtype, device and grad state by its role, the trained model
before `prepare`, the export's fp32 state, and `weatherkd plan` counting by the same rules."""

import pytest
import torch
from torch import nn

from weatherkd import config as C
from weatherkd.commands import plan
from weatherkd.errors import UserError
from weatherkd.precision import DTYPES, Helper, Precision, refuse_unrunnable

PRECISIONS = ["no", "bf16", "fp16"]


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1))


def dtypes(module: nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()}


@pytest.mark.parametrize("mixed", PRECISIONS)
@pytest.mark.parametrize("role", ["frozen", "averaged", "bundled"])
def test_each_role_is_frozen_in_eval_mode_in_its_dtype(mixed, role):
    precision = Precision(mixed, channels_last=True)
    helper = Helper(net().train(), role)
    precision.place(helper)
    m = helper.module
    want = torch.float32 if role == "averaged" else DTYPES[mixed]
    assert dtypes(m) == {want} == {precision.dtype_of(role)}
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert all(p.device.type == "cpu" for p in m.parameters())
    assert m[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mixed", PRECISIONS)
def test_a_bundled_helper_exports_its_weights_as_loaded(mixed):
    loaded = net().state_dict()
    bundled, frozen = Helper(net(), "bundled"), Helper(net(), "frozen")
    for h in (bundled, frozen):
        Precision(mixed).place(h)
    state = bundled.export_state()
    assert state.keys() == loaded.keys()
    for k, v in loaded.items():
        assert torch.equal(state[k], v) and state[k].dtype == v.dtype
    # a frozen helper is not exported, and keeps no copy; nor does a bundled one that is not rounded
    assert frozen.loaded is None
    assert (bundled.loaded is None) == (mixed == "no")


def test_only_the_main_process_keeps_a_bundled_helpers_loaded_weights():
    helper = Helper(net(), "bundled")
    Precision("bf16").place(helper, main_process=False)
    assert helper.loaded is None and dtypes(helper.module) == {torch.bfloat16}


def test_a_helper_without_float_weights_keeps_its_buffers_dtype():
    helper = Helper(nn.Sequential(nn.Identity()), "frozen")
    helper.module.register_buffer("table", torch.rand(4, dtype=torch.float64))
    Precision("bf16").place(helper)
    assert helper.module.table.dtype == torch.float64


@pytest.mark.parametrize("mixed", PRECISIONS)
@pytest.mark.parametrize("deepspeed", [False, True])
def test_the_trained_model_before_prepare(mixed, deepspeed):
    precision = Precision(mixed, channels_last=True, deepspeed=deepspeed)
    model, ema = precision.prepare_trained(net(), ema_decay=0.9)
    # DeepSpeed's first broadcast needs row-major weights; DDP takes channels_last ones
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) == (not deepspeed)
    bn = model[1]
    # DeepSpeed casts the weights to 16 bits, so batch norm needs its statistics in the same dtype
    assert bn.running_mean.dtype == bn.running_var.dtype == (DTYPES[mixed] if deepspeed else torch.float32)
    assert model[0].weight.dtype == torch.float32  # prepare() casts it (DeepSpeed), or autocast does per op
    assert dtypes(ema.module) == {torch.float32} and not ema.training
    assert precision.prepare_trained(net(), ema_decay=0)[1] is None


class _OneProcess:
    """What ``export_state`` asks of an Accelerator, in one process without DeepSpeed."""

    is_main_process = True

    def get_state_dict(self, model):
        return model.state_dict()

    def unwrap_model(self, model):
        return model


@pytest.mark.parametrize("mixed", PRECISIONS)
def test_the_export_is_fp32_from_the_ema_when_there_is_one(mixed):
    precision = Precision(mixed)
    model, ema = precision.prepare_trained(net(), ema_decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(1)
    rounded = model.to(DTYPES[mixed])  # the module as DeepSpeed would hold it
    state = precision.export_state(_OneProcess(), rounded, None)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    from_ema = precision.export_state(_OneProcess(), rounded, ema)
    assert torch.equal(from_ema["0.weight"], ema.module[0].weight)
    assert not torch.equal(from_ema["0.weight"], state["0.weight"])
    elsewhere = _OneProcess()
    elsewhere.is_main_process = False
    assert precision.export_state(elsewhere, rounded, ema) is None


def test_fp16_is_refused_in_one_line_where_it_cannot_run(monkeypatch):
    with pytest.raises(UserError, match="needs a GPU or a DeepSpeed launch") as e:
        refuse_unrunnable("fp16", deepspeed=False, no_gpu=True)
    assert "\n" not in str(e.value)
    monkeypatch.setattr("weatherkd.precision.cpu_runs_fp16", lambda: False)
    with pytest.raises(UserError, match="oneDNN's fp16 kernels"):
        refuse_unrunnable("fp16", deepspeed=True, no_gpu=True)
    for mixed, deepspeed, no_gpu in (("fp16", False, False), ("bf16", False, True), ("no", True, True),
                                     (None, False, True)):
        refuse_unrunnable(mixed, deepspeed, no_gpu)
    monkeypatch.setattr("weatherkd.precision.cpu_runs_fp16", lambda: True)
    refuse_unrunnable("fp16", deepspeed=True, no_gpu=True)


@pytest.mark.parametrize("mixed", PRECISIONS)
@pytest.mark.parametrize("role", ["frozen", "averaged", "bundled"])
def test_plan_counts_a_helper_as_the_policy_places_it(mixed, role):
    precision = Precision(mixed)
    helper = Helper(net(), role)
    precision.place(helper)
    placed = sum(p.numel() * p.element_size() for p in helper.module.parameters())
    params = sum(p.numel() for p in helper.module.parameters())
    assert plan.Counted(params, role).bytes(precision) == placed


@pytest.mark.parametrize("mixed", PRECISIONS)
def test_plan_holds_the_ema_and_dckds_models_in_their_roles_dtypes(mixed):
    from weatherkd.recipes.distill import Config

    cfg = C.load(Config, "configs/distill/demo.yaml", ["objective=dckd", "dckd.frozen_precision=bf16", "teacher=", "vq=",
                                                        "train.ema_decay=0.99", f"train.mixed_precision={mixed}"])
    planned = plan.planned_models("distill", cfg)
    n = sum(p.numel() for p in planned.trained.parameters())
    assert {k: c.role for k, c in planned.held.items()} == {"EMA": "averaged", "history model": "averaged"}
    precision = Precision(mixed)
    # both average the student: fp32 whatever the compute dtype, and the negatives' copy in bf16
    assert planned.bytes(precision) == 4 * n + 4 * n + 2 * n
