"""Shared test helpers: tiny shard sets and real multi-process launches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from weatherkd.data.samples import encode_sample
from weatherkd.data.shards import ShardSetWriter

REPO = Path(__file__).resolve().parents[1]
PROCS = Path(__file__).parent / "procs"
UNIT = Path(__file__).parent / "unit"


def pytest_collection_modifyitems(config, items):
    """Two tiers: tests/unit/ runs in process (`pytest tests/unit`, under 2 minutes); everything
    else launches real processes and is marked `launch` (`pytest -m launch`)."""
    for item in items:
        if UNIT not in Path(item.fspath).parents:
            item.add_marker(pytest.mark.launch)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"ACCELERATE_USE_CPU": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"})
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def run_cli(*args, cwd=None, check=True, timeout=600, env=None) -> subprocess.CompletedProcess:
    """`weatherkd ARGS...` in a subprocess, exactly as a user types it."""
    proc = subprocess.run([sys.executable, "-m", "weatherkd", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=env or cli_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"weatherkd {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def refused(*args) -> subprocess.CompletedProcess:
    """`weatherkd ARGS...` for a request that must be refused before anything is built, run in this
    process: the same ``cli.main`` a user's process runs, without a process start (torch's import,
    ~3 s). The result reads like ``run_cli``'s; a traceback would fail the test by raising here."""
    import contextlib
    import io
    import logging

    from weatherkd import cli, logs

    logs.setup()
    handler = logging.getLogger("weatherkd").handlers[0]
    out, err = io.StringIO(), io.StringIO()
    old = handler.setStream(err)
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as e:  # argparse's usage errors
                code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
                if isinstance(e.code, str):
                    print(e.code, file=err)
    finally:
        os.chdir(cwd)
        handler.setStream(old)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


FP16_REFUSAL = "error: train.mixed_precision: fp16 under DeepSpeed on a CPU needs oneDNN's fp16 kernels"


def refuses_fp16(launch: str, precision: str) -> bool:
    """DeepSpeed in fp16 on a CPU without oneDNN's fp16 kernels (AVX512-FP16 or AMX-FP16): every
    rank refuses in one line (``placement.make_accelerator``); where the CPU has them, it trains."""
    import torch

    from weatherkd.precision import cpu_runs_fp16

    return precision == "fp16" and "zero" in launch and not torch.cuda.is_available() and not cpu_runs_fp16()


def assert_one_line_refusal(proc, line: str) -> None:
    assert proc.returncode != 0 and line in proc.stderr, proc.stderr[-3000:]
    frames = [f for f in proc.stderr.splitlines() if f.lstrip().startswith("File ")]
    assert not any("/weatherkd/" in f for f in frames), "the ranks' own one line, not a traceback from weatherkd"


def accelerate_launch(script_args: list, nproc: int = 2, config: str = "launch/cpu-ddp.yaml",
                      timeout: int = 180, module: bool = False, env=None, check: bool = True
                      ) -> subprocess.CompletedProcess:
    """A real `accelerate launch` with ``nproc`` CPU processes over gloo; ``check=False`` returns
    a failed (or killed) launch instead of raising."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config),
           "--num_processes", str(nproc), "--main_process_port", str(free_port())]
    if module:
        cmd.append("-m")
    cmd += [str(a) for a in script_args]
    popen = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env or cli_env(), start_new_session=True)
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM lets torchrun stop its workers (they live in their own process groups, and
        # SIGKILL to the launcher would orphan them); SIGKILL the group if that stalls.
        popen.send_signal(signal.SIGTERM)
        try:
            out, err = popen.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            out, err = popen.communicate()
        raise AssertionError(f"accelerate launch timed out after {timeout}s: {' '.join(cmd)}\n"
                             f"stdout:\n{out[-3000:]}\nstderr:\n{err[-6000:]}") from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"accelerate launch exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return proc


def read_rank_reports(out: Path, nproc: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def make_set(path: Path, counts: dict[tuple[str, str], int], size: int = 12, shard_size: int = 3,
             weathers=("rain_haze", "raindrop", "snow"), seed: int = 0, target: bool = True,
             encoding: str = "png") -> dict:
    """A small shard set of random images: ``counts[(split, weather)]`` samples each."""
    rng = np.random.default_rng(seed)
    writer = ShardSetWriter(path, list(weathers), shard_size=shard_size)
    for (split, w), n in counts.items():
        for i in range(n):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            clean = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if target else None
            meta = {"i": i, "origin": f"photo{i % 2}"}
            sample = encode_sample(f"{split}_{w}_{i:04d}", img, list(weathers).index(w), meta, target=clean,
                                   encoding=encoding)
            writer.add(split, w, sample)
    return writer.close()


def dreamer(teacher, tmp_path, *overrides):
    """`weatherkd dream`'s Dreamer on the demo config, small."""
    from weatherkd import config as cfgmod
    from weatherkd.jobs import dream

    cfg = cfgmod.load(dream.Config, "configs/dream/demo.yaml",
                      [f"teacher={teacher}", f"out_dir={tmp_path / 'dream'}", "size=32", "batch_size=6",
                       *overrides])
    return dream.Dreamer(cfg)


@pytest.fixture(scope="session")
def builtin_set(tmp_path_factory) -> Path:
    """A small set built by the real `weatherkd shards synth` from the bundled photos."""
    out = tmp_path_factory.mktemp("sets") / "builtin"
    run_cli("shards", "synth", "--out", out, "--train", 16, "--test", 2, "--size", 48, "--test-size", 96)
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, builtin_set) -> Path:
    """The demo teacher's recipe for a few steps, exported the real way: with its weather
    classifier and the feature statistics teacher inversion matches."""
    out = tmp_path_factory.mktemp("teacher")
    run_cli("teacher", "--config", "configs/teacher/demo.yaml", f"out_dir={out}", f"data.train_shards={builtin_set}",
            "train.max_steps=4", "train.eval_every=4", "train.log_every=2", "ckpt.every=4", "data.crop=32",
            "data.batch_size=4", "loss.srd_start=2", "tracker.kind=none", "stats.batches=4", "data.num_workers=0")
    return out / "model"
