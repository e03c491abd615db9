"""The command line contract: every stage listed, unbuilt stages honest, `python -m` identical."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli, refused

STAGES = ["shards", "teacher", "distill", "vq", "adapter", "synth", "dream", "prune", "eval", "bench",
          "report", "demo"]


def test_help_lists_every_stage():
    out = run_cli("--help").stdout
    for stage in STAGES:
        assert f"    {stage}" in out, stage
    console = Path(sys.executable).parent / "weatherkd"
    same = subprocess.run([str(console), "--help"], capture_output=True, text=True, check=True).stdout
    assert same.replace("weatherkd", "") == out.replace("weatherkd", "")


def test_unknown_bench_and_untrainable_bench_step_are_one_line(tmp_path):
    proc = refused("bench", "no-such-bench")
    assert proc.returncode == 2 and "invalid choice: 'no-such-bench'" in proc.stderr and "Traceback" not in proc.stderr
    proc = refused("bench", "step", "--config", "configs/dream/demo.yaml")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: bench step times") and "teacher, distill, vq, adapter" in lines[-1]


def test_user_errors_are_one_line_without_traceback(tmp_path):
    proc = refused("shards", "inspect", tmp_path / "missing")
    assert proc.returncode == 1
    assert "shard set not found" in proc.stderr and "Traceback" not in proc.stderr


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert command.strip() in readme


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a GPU")
def test_fp16_without_a_gpu_or_deepspeed_is_one_line(tmp_path):
    """accelerate gives fp16 on the CPU neither autocast nor a loss scaler; the engine had cast the
    frozen helpers to fp16 regardless, and the teacher's first step ended in a dtype traceback."""
    proc = refused("vq", "--config", "configs/vq/demo.yaml", f"out_dir={tmp_path / 'vq'}", "tracker.kind=none",
                   "train.mixed_precision=fp16")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: train.mixed_precision: fp16 needs a GPU")
    assert not (tmp_path / "vq").exists()
