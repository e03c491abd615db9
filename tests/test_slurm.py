"""The SLURM templates, submitted with real sbatch to a real local cluster (slurm/local-cluster.sh).

Skipped, with the reason, only where SLURM is missing and apt cannot install it.
"""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, cli_env, free_port, make_set

TEMPLATES = sorted(p.name for p in (REPO / "slurm").glob("*.sbatch"))
JOB_ENV = "ALL,PROCS_PER_NODE=1,LAUNCH=launch/cpu-ddp.yaml,OMP_NUM_THREADS=1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, WEATHERKD_SLURM_DIR=str(state), WEATHERKD_SLURM_PORT=str(free_port() // 4 * 4))
    script = REPO / "slurm" / "local-cluster.sh"
    try:
        proc = subprocess.run([str(script), "start"], env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired:
        pytest.skip("no SLURM here and installing it with apt did not finish in 400 s")
    if proc.returncode != 0:
        if "could not install slurm" in proc.stderr or "not installed" in proc.stderr:
            pytest.skip(f"no SLURM here and apt cannot install it: {proc.stderr.strip()}")
        raise AssertionError(f"local cluster did not start:\n{proc.stdout}\n{proc.stderr}")
    env = dict(cli_env(), SLURM_CONF=str(state / "slurm.conf"), WEATHERKD_BIN=str(Path(os.sys.executable).parent))
    yield env
    subprocess.run([str(script), "stop"], env=dict(env, WEATHERKD_SLURM_DIR=str(state)), capture_output=True)


def sh(cmd: list, env, check=True, timeout=60) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def submit(env, *args) -> str:
    return sh(["sbatch", "--parsable", *args], env).stdout.strip().split(";")[0]


def job_state(env, job: str) -> str:
    return sh(["scontrol", "show", "job", job], env).stdout


def wait_for(env, job: str, timeout: float, log: Path | None = None) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = re.search(r"JobState=(\S+)", job_state(env, job)).group(1)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(2)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    sh(["scancel", job], env, check=False)
    raise AssertionError(f"job {job} did not finish within {timeout}s\n{job_state(env, job)}\n{tail}")


def test_every_template_passes_sbatch_test_only(cluster):
    assert {"shards.sbatch", "teacher.sbatch", "distill.sbatch", "eval.sbatch", "array.sbatch"} <= set(TEMPLATES)
    for name in TEMPLATES:
        text = (REPO / "slurm" / name).read_text()
        for header in ("--nodes", "--gpus-per-node", "--cpus-per-task", "--time", "--requeue", "--signal=B:USR2",
                       "--output=slurm/logs/"):
            assert f"#SBATCH {header}" in text, (name, header)
        extra = ["--array=0-3"] if name == "array.sbatch" else []
        proc = sh(["sbatch", "--test-only", *extra, f"slurm/{name}", "--config", "x.yaml"], cluster)
        assert "to start at" in proc.stderr, (name, proc.stderr)


@pytest.fixture(scope="module")
def distill_args(tmp_path_factory):
    shards = tmp_path_factory.mktemp("slurm-data") / "set"
    make_set(shards, {("train", w): 8 for w in ("rain_haze", "raindrop", "snow")}
             | {("test", w): 1 for w in ("rain_haze", "raindrop", "snow")}, size=40)
    return ["--config", "configs/distill/demo.yaml", "objective=scratch", f"data.train_shards={shards}", "train.max_steps=60",
            "train.eval_every=0", "train.log_every=5", "ckpt.every=1000", "ckpt.preempt_check_every=5",
            "data.crop=32", "tracker.kind=none", "train.warmup_steps=2"]


@pytest.fixture(scope="module")
def straight_run(cluster, distill_args, tmp_path_factory):
    """A 2-node × 1-process distill job, uninterrupted."""
    out = tmp_path_factory.mktemp("slurm-runs") / "straight"
    job = submit(cluster, "--nodes=2", f"--export={JOB_ENV}", f"--output={out}.out", "slurm/distill.sbatch",
                 *distill_args, f"out_dir={out}")
    log = Path(f"{out}.out")
    state = wait_for(cluster, job, 400, log)
    return out, log, state


def test_two_node_distill_runs_and_ranks_synchronise(straight_run):
    out, log, state = straight_run
    assert state == "COMPLETED", log.read_text()[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ranks_in_sync"] and len(set(metrics["rank_checksums"])) == 1
    assert "on n[1-2]" in log.read_text()


def test_preempted_job_requeues_and_matches_an_uninterrupted_run(cluster, distill_args, straight_run, tmp_path):
    straight = straight_run[0]
    out = tmp_path / "preempted"
    log = tmp_path / "job.out"  # a fresh log: the local cluster restarts job ids at 1
    job = submit(cluster, "--nodes=2", f"--export={JOB_ENV}", f"--output={log}", "slurm/distill.sbatch",
                 *distill_args, f"out_dir={out}")
    deadline = time.time() + 300
    while not re.search(r"step (1\d|[2-5]\d) ", log.read_text() if log.exists() else ""):
        assert time.time() < deadline, f"no training progress:\n{log.read_text()[-3000:] if log.exists() else ''}"
        time.sleep(0.5)
    sh(["scancel", "--batch", "--signal=USR2", job], cluster)  # what --signal=B:USR2@120 sends at the end
    assert wait_for(cluster, job, 500, log) == "COMPLETED"
    text = log.read_text()
    assert "requeueing" in text and "preempted" in text and "resumed from" in text, text[-5000:]
    assert "Restarts=1" in job_state(cluster, job)
    assert json.loads((out / "metrics.json").read_text())["step"] == 60
    a = (straight / "model" / "model.safetensors").read_bytes()
    b = (out / "model" / "model.safetensors").read_bytes()
    assert a == b


def test_pipeline_submitter_chains_every_stage(cluster, tmp_path):
    out, shards = tmp_path / "pipe", tmp_path / "shards"
    jobs = {}
    try:
        proc = sh(["slurm/submit-pipeline.sh", "--out", out, "--shards", shards, "--hold"], cluster)
        jobs = dict(line.split("\t") for line in (out / "slurm-jobs.tsv").read_text().splitlines())
        assert list(jobs) == ["shards", "teacher", "vq", "eval-teacher", "distill-scratch", "eval-distill-scratch",
                              "distill-kd", "eval-distill-kd", "distill-dckd", "eval-distill-dckd", "dream",
                              "distill-dream", "eval-distill-dream", "prune", "eval-prune", "distill-pruned",
                              "eval-distill-pruned"], proc.stderr
        deps = {name: re.search(r"Dependency=(\S+)", job_state(cluster, jid)).group(1) for name, jid in jobs.items()}
        assert deps["shards"] == "(null)"
        assert deps["teacher"] == f"afterok:{jobs['shards']}(unfulfilled)"
        assert deps["distill-kd"] == f"afterok:{jobs['teacher']}(unfulfilled),afterok:{jobs['vq']}(unfulfilled)"
        assert deps["eval-distill-dckd"] == f"afterok:{jobs['distill-dckd']}(unfulfilled)"
        assert f"out_dir={out}/distill-kd" in job_state(cluster, jobs["distill-kd"])
        assert "configs/distill/demo.yaml objective=kd" in job_state(cluster, jobs["distill-kd"])
        assert f"network={out}/teacher/model" in job_state(cluster, jobs["prune"])
        # The data-free branch: a 2-task dream array after the teacher; prune and distill-dream after all of it.
        assert deps["dream"] == f"afterok:{jobs['teacher']}(unfulfilled)"
        assert "ArrayTaskId=0-1" in job_state(cluster, jobs["dream"])
        assert deps["prune"] == deps["distill-dream"] == f"afterok:{jobs['dream']}_*(unfulfilled)"
        assert deps["distill-pruned"] == f"afterok:{jobs['prune']}(unfulfilled)"
        assert f"init={out}/prune/model" in job_state(cluster, jobs["distill-pruned"])
    finally:
        tsv = out / "slurm-jobs.tsv"
        ids = [ln.split("\t")[1] for ln in tsv.read_text().splitlines()] if tsv.exists() else []
        if ids:
            sh(["scancel", *ids], cluster, check=False)


def test_pipeline_submitter_runs_the_allweather_set_with_both_students_and_d4ir(cluster, tmp_path):
    out, shards = tmp_path / "pipe", tmp_path / "allweather"
    refused = sh(["slurm/submit-pipeline.sh", "--config-set", "allweather", "--out", out, "--shards", shards],
                 cluster, check=False)
    assert refused.returncode == 2 and "is not a shard set; ingest it first" in refused.stderr
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")  # submitted held, never run: the set need only exist
    jobs = {}
    try:
        sh(["slurm/submit-pipeline.sh", "--config-set", "allweather", "--out", out, "--shards", shards,
            "--synth-tasks", "4", "--hold"], cluster)
        jobs = dict(line.split("\t") for line in (out / "slurm-jobs.tsv").read_text().splitlines())
        assert "shards" not in jobs
        for student in ("distill", "distill-medium"):
            assert {f"{student}-{o}" for o in ("scratch", "kd", "dckd")} <= set(jobs)
        assert list(jobs)[-4:] == ["adapter", "synth", "distill-d4ir", "eval-distill-d4ir"]
        medium = job_state(cluster, jobs["distill-medium-dckd"])
        assert "configs/distill/allweather-student-medium.yaml objective=dckd" in medium
        assert "configs/teacher/allweather.yaml" in job_state(cluster, jobs["teacher"])
        synth = job_state(cluster, jobs["synth"])
        assert "ArrayTaskId=0-3" in synth and f"adapter={out}/adapter/model" in synth
        dep = re.search(r"Dependency=(\S+)", synth).group(1)
        assert dep == f"afterok:{jobs['adapter']}(unfulfilled),afterok:{jobs['teacher']}(unfulfilled)"
    finally:
        if jobs:
            sh(["scancel", *jobs.values()], cluster, check=False)


def run_array(cluster, tmp_path, tasks: tuple[int, int], *stage_args) -> dict[int, str]:
    """``slurm/array.sbatch STAGE_ARGS`` as array tasks ``tasks[0]..tasks[1]``; their logs once all completed."""
    job = submit(cluster, f"--array={tasks[0]}-{tasks[1]}", f"--export={JOB_ENV}", f"--output={tmp_path}/%A_%a.out",
                 "slurm/array.sbatch", *stage_args)
    logs = {}
    for task in range(tasks[0], tasks[1] + 1):
        log = tmp_path / f"{job}_{task}.out"
        assert wait_for(cluster, f"{job}_{task}", 300, log) == "COMPLETED", log.read_text()[-3000:]
        logs[task] = log.read_text()
    return logs


def test_array_template_splits_synthesis_across_tasks(cluster, tmp_path):
    """Two array tasks (numbered 3-4: slices count from the array's start) write one complete set."""
    from tiny_sd import save_d4ir_parts

    parts = save_d4ir_parts(tmp_path)
    out = tmp_path / "synth"
    logs = run_array(cluster, tmp_path, (3, 4), "synth", "--config", "configs/synth/demo.yaml", f"out_dir={out}",
                     f"sd_path={parts['sd']}", f"adapter={parts['adapter']}", f"clean={parts['clean']}", "teacher=",
                     "size=32", "steps=2", "strength=0.5", "shard_size=3", "batch_size=3")
    assert "task 0/2: 4 of its 4 shards" in logs[3] and "task 1/2: 3 of its 3 shards" in logs[4]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"] == {"train": {"mixed": 21}} and len(manifest["shards"]) == 7


# The same array template as synthesis above (which runs by default); dream's own slicing is
# covered by test_dream's 2-process resumable set.
@pytest.mark.slow
def test_array_template_splits_dreaming_across_tasks(cluster, tiny_teacher, tmp_path):
    out = tmp_path / "dream"
    logs = run_array(cluster, tmp_path, (0, 1), "dream", "--config", "configs/dream/demo.yaml", f"out_dir={out}",
                     f"teacher={tiny_teacher}", "samples=6", "size=32", "batch_size=2", "shard_size=2",
                     "iterations=2")
    assert "task 0/2: 2 of its 2 shards" in logs[0] and "task 1/2: 1 of its 1 shards" in logs[1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"] == {"train": {"mixed": 6}} and manifest["created_by"]["stage"] == "dream"
