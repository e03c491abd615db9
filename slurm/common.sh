# Sourced by every sbatch template: environment, the preemption trap, one `accelerate launch` per node.
#
# Submit from the repository root (the templates cd to $SLURM_SUBMIT_DIR). Knobs, as environment
# variables on the sbatch line (`sbatch --export=ALL,LAUNCH=... slurm/teacher.sbatch ...`):
#   LAUNCH          accelerate config under launch/ (each template sets its own default)
#   PROCS_PER_NODE  processes per node (default: the GPUs SLURM gave the node, else 1)
#   WEATHERKD_BIN   folder holding `accelerate` and `weatherkd` (default: .venv/bin)
#   MAIN_PORT       rendezvous port on the head node (default: derived from the job id)

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?run through sbatch, from the repository root}"
WEATHERKD_BIN=${WEATHERKD_BIN:-.venv/bin}
[ -x "$WEATHERKD_BIN/accelerate" ] || { echo "error: $WEATHERKD_BIN/accelerate not found; set WEATHERKD_BIN" >&2; exit 1; }

# Preemption. `#SBATCH --signal=B:USR2@120` sends USR2 to this shell two minutes before the end.
# torchrun forwards only INT/TERM/HUP/QUIT to workers, so the trap touches a stop file the engine
# checks at step boundaries (all ranks agree, all checkpoint); when the launch has ended the job
# requeues itself and the rerun resumes from `latest`. A plain scancel (TERM) cancels as usual.
export WEATHERKD_STOP_FILE=${WEATHERKD_STOP_FILE:-$PWD/slurm/logs/${SLURM_JOB_ID}.stop}
rm -f "$WEATHERKD_STOP_FILE"
preempted=0
on_preempt() {
    preempted=1
    echo "$(date '+%F %T') job $SLURM_JOB_ID: pre-termination signal, asking the run to checkpoint" >&2
    touch "$WEATHERKD_STOP_FILE"
}
trap on_preempt USR2

echo "$(date '+%F %T') job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $*" >&2

# Run a command in the background, so the trap fires at once rather than when it ends; wait for it
# to really end; requeue if preempted, otherwise exit with its status.
run_requeueable() {
    "$@" &
    local pid=$! rc=0
    while kill -0 "$pid" 2>/dev/null; do
        rc=0
        wait "$pid" || rc=$?
    done
    if [ "$preempted" = 1 ]; then
        echo "$(date '+%F %T') job $SLURM_JOB_ID: checkpointed (exit $rc), requeueing" >&2
        rm -f "$WEATHERKD_STOP_FILE"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    return "$rc"
}

# One `accelerate launch` per node: machine rank from SLURM_NODEID, head node from the node list.
launch_per_node() {
    export LAUNCH WEATHERKD_BIN
    export HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    run_requeueable srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
        exec "$WEATHERKD_BIN/accelerate" launch --config_file "$LAUNCH" \
            --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * PROCS_PER_NODE)) \
            --machine_rank "$SLURM_NODEID" --main_process_ip "$HEAD_NODE" --main_process_port "$MAIN_PORT" \
            -m weatherkd "$@"' launch "$@"
}
