"""Every training stage under every CPU launch (DDP, ZeRO-1/2/3) in every precision, three steps
each: fp16 under DeepSpeed and 16-bit ZeRO runs each stopped at their first step or update until
they were run this way (docs/launching.md). Each export must hold fp32 weights. Slow: 60
launches, 6.5 min on 2 cores."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FP16_REFUSAL, accelerate_launch, assert_one_line_refusal, refuses_fp16, run_cli

LAUNCHES = ["cpu-ddp", "cpu-zero1", "cpu-zero2", "cpu-zero3"]
PRECISIONS = ["no", "bf16", "fp16"]
STAGES = ["teacher", "vq", "kd", "dckd", "adapter"]


@pytest.fixture(scope="module")
def inputs(builtin_set, tiny_teacher, tmp_path_factory):
    vq = tmp_path_factory.mktemp("matrix") / "vq"
    run_cli("vq", "--config", "configs/vq/demo.yaml", f"out_dir={vq}", f"data.train_shards={builtin_set}",
            "train.max_steps=2", "tracker.kind=none", "data.crop=32", "data.num_workers=0")
    return {"shards": builtin_set, "teacher": tiny_teacher, "vq": vq / "model"}


def stage_args(stage: str, i: dict) -> list[str]:
    shards = f"data.train_shards={i['shards']}"
    return {
        "teacher": ["teacher", "--config", "configs/teacher/demo.yaml", shards, "model.size=tiny"],
        "vq": ["vq", "--config", "configs/vq/demo.yaml", shards],
        "kd": ["distill", "--config", "configs/distill/demo.yaml", "objective=kd", shards, f"teacher={i['teacher']}"],
        "dckd": ["distill", "--config", "configs/distill/demo.yaml", "objective=dckd", shards,
                 f"teacher={i['teacher']}", f"vq={i['vq']}", "history.every=[1]", "history.milestones=[]"],
        "adapter": ["adapter", "--config", "configs/adapter/demo.yaml", shards],
    }[stage]


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_under_every_cpu_launch_and_precision(stage, launch, precision, inputs, tmp_path):
    out = tmp_path / "run"
    proc = accelerate_launch(["weatherkd", *stage_args(stage, inputs), f"out_dir={out}", "tracker.kind=none",
                              "train.max_steps=3", "train.eval_every=0", "ckpt.every=3", "data.crop=32",
                              "data.num_workers=0", f"train.mixed_precision={precision}"],
                             config=f"launch/{launch}.yaml", module=True, check=False)
    if precision == "fp16" and launch == "cpu-ddp" and torch.cuda.is_available():
        pytest.skip("the CPU's fp16 refusal: with a GPU, DDP takes the GPU")
    if precision == "fp16" and launch == "cpu-ddp":  # accelerate has no fp16 on the CPU
        return assert_one_line_refusal(proc, "error: train.mixed_precision: fp16 needs a GPU")
    if refuses_fp16(launch, precision):
        return assert_one_line_refusal(proc, FP16_REFUSAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 3 and metrics["ranks_in_sync"]
    assert metrics["parallelism"] == ("multi_cpu" if launch == "cpu-ddp" else f"deepspeed-{launch.split('-')[1]}")
    # The export holds fp32 weights whatever trained, bundled helpers too (the teacher's CLIP
    # tower): 16-bit training rounds only the working copies (precision.Precision.export_state).
    exported = load_file(out / "model" / "model.safetensors")
    assert {t.dtype for t in exported.values() if t.is_floating_point()} == {torch.float32}
