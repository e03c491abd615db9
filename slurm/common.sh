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
# torchrun forwards only INT/TERM/HUP/QUIT to workers, so the trap touches a stop file; training
# stages check it at step boundaries (all ranks agree, all checkpoint) and delete it once their
# checkpoint is saved. The exit code cannot tell us (torchrun turns the engine's 75 into 1), so the
# consumed stop file is what says "checkpointed": only then does the job requeue itself, and the
# rerun resumes from its newest checkpoint. A run that finished before it saw the file is not requeued.
# Stages without checkpoints (shards, eval, arrays) are stopped and requeued to start over.
# A plain scancel (TERM) cancels as usual.
export WEATHERKD_STOP_FILE=${WEATHERKD_STOP_FILE:-$PWD/slurm/logs/${SLURM_JOB_ID}.stop}
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}  # srun does not inherit --cpus-per-task (22.05+)
rm -f "$WEATHERKD_STOP_FILE"
preempted=0
running=""
restart_mode=0
on_preempt() {
    preempted=1
    echo "$(date '+%F %T') job $SLURM_JOB_ID: pre-termination signal" >&2
    touch "$WEATHERKD_STOP_FILE"
    if [ "$restart_mode" = 1 ] && [ -n "$running" ]; then
        kill -TERM "$running" 2>/dev/null || true
    fi
}
trap on_preempt USR2

echo "$(date '+%F %T') job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $*" >&2

# run_requeueable checkpoint|restart COMMAND...
# Runs the command in the background, so the trap fires at once rather than when it ends, waits
# for it to really end, then requeues (see above) or exits with its status.
run_requeueable() {
    [ "$1" = restart ] && restart_mode=1
    shift
    "$@" &
    running=$!
    local rc=0
    while :; do
        rc=0
        wait "$running" || rc=$?
        kill -0 "$running" 2>/dev/null || break  # a trap interrupts wait; the command may still run
    done
    if [ "$rc" -gt 128 ]; then  # the last wait was interrupted after the command ended: get its status
        wait "$running" 2>/dev/null && rc=0 || { r=$?; [ "$r" != 127 ] && rc=$r; }
    fi
    if [ "$preempted" = 1 ] && { [ "$restart_mode" = 1 ] || [ ! -e "$WEATHERKD_STOP_FILE" ]; }; then
        echo "$(date '+%F %T') job $SLURM_JOB_ID: stopped for preemption (exit $rc), requeueing" >&2
        rm -f "$WEATHERKD_STOP_FILE"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    rm -f "$WEATHERKD_STOP_FILE"
    return "$rc"
}

# One `accelerate launch` per node: machine rank from SLURM_NODEID, head node from the node list.
# MODE is checkpoint for training stages, restart for the rest.
launch_per_node() {
    local mode=$1
    shift
    export LAUNCH WEATHERKD_BIN
    HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [ -n "$HEAD_NODE" ] || { echo "error: no head node in '$SLURM_JOB_NODELIST'" >&2; exit 1; }
    export HEAD_NODE
    export MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    [ "$PROCS_PER_NODE" -ge 1 ] || PROCS_PER_NODE=1
    run_requeueable "$mode" srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
        exec "$WEATHERKD_BIN/accelerate" launch --config_file "$LAUNCH" \
            --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * PROCS_PER_NODE)) \
            --machine_rank "$SLURM_NODEID" --main_process_ip "$HEAD_NODE" --main_process_port "$MAIN_PORT" \
            -m weatherkd "$@"' launch "$@"
}
