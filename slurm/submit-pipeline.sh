#!/usr/bin/env bash
# Submit the whole pipeline as SLURM jobs chained with --dependency=afterok, from the repository root:
#
#   shards ─┬─> teacher ─┬─> distill-kd ───> eval-distill-kd
#           ├─> vq ──────┴─> distill-dckd ─> eval-distill-dckd
#           └─> distill-scratch ───────────> eval-distill-scratch
#               teacher ─┬─────────────────> eval-teacher
#                        └─> dream (array) ─┬─> distill-dream ──────────> eval-distill-dream
#                                           └─> prune ─┬─> distill-pruned ─> eval-distill-pruned
#                                                      └─> eval-prune
#
#   slurm/submit-pipeline.sh [--out runs/pipeline] [--shards shards/demo] [--config-set demo]
#                            [--dream-tasks 2] [--hold] [--sbatch-arg ARG]... [-- key=value ...]
#
# --config-set NAME uses configs/teacher/NAME.yaml, configs/vq/NAME.yaml,
# configs/distill/NAME-{scratch,kd,dckd,dream,pruned}.yaml, configs/dream/NAME.yaml and
# configs/prune/NAME.yaml. --dream-tasks sets the dream array's size (each task dreams its own
# slice of the shards). --sbatch-arg is passed to every sbatch (partition,
# account, or sizes). key=value after -- go to every training stage. --hold submits held
# (release with `scontrol release JOBID`). The shards job is skipped when the set exists.
# Prints one line per job (stage, job id) and writes them to OUT/slurm-jobs.tsv.
set -euo pipefail
shopt -s inherit_errexit  # a failing sbatch inside $(submit ...) must stop the script

out=runs/pipeline shards=shards/demo config_set=demo dream_tasks=2 hold=() extra=() overrides=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --shards) shards=$2; shift 2 ;;
        --config-set) config_set=$2; shift 2 ;;
        --dream-tasks) dream_tasks=$2; shift 2 ;;
        --hold) hold=(--hold); shift ;;
        --sbatch-arg) extra+=("$2"); shift 2 ;;
        --) shift; overrides=("$@"); break ;;
        *) echo "submit-pipeline: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
    esac
done
[ -f slurm/common.sh ] || { echo "submit-pipeline: run from the repository root" >&2; exit 2; }
for f in configs/{teacher,vq,dream,prune}/$config_set.yaml configs/distill/$config_set{,-dream,-pruned}.yaml; do
    [ -f "$f" ] || { echo "submit-pipeline: $f not found (--config-set $config_set)" >&2; exit 2; }
done
[[ $dream_tasks =~ ^[1-9][0-9]*$ ]] || { echo "submit-pipeline: --dream-tasks must be a positive integer" >&2; exit 2; }
mkdir -p "$out" slurm/logs
jobs_file=$out/slurm-jobs.tsv
: >"$jobs_file"

# submit NAME AFTER [--SBATCH-OPTION...] TEMPLATE ARGS... -> prints the job id; AFTER is a
# colon-separated id list or ""
submit() {
    local name=$1 after=$2 own=()
    shift 2
    while [[ $1 == --* ]]; do own+=("$1"); shift; done
    local template=$1
    shift
    local dep=()
    [ -n "$after" ] && dep=(--dependency="afterok:$after" --kill-on-invalid-dep=yes)
    local id
    id=$(sbatch --parsable ${hold[@]+"${hold[@]}"} ${dep[@]+"${dep[@]}"} --job-name="wkd-$name" \
        ${extra[@]+"${extra[@]}"} ${own[@]+"${own[@]}"} "slurm/$template" "$@")
    id=${id%%;*}
    [ -n "$id" ] || { echo "submit-pipeline: sbatch gave no job id for $name" >&2; exit 1; }
    printf '%s\t%s\n' "$name" "$id" | tee -a "$jobs_file" >&2
    echo "$id"
}

shards_job=""
if [ ! -f "$shards/manifest.json" ]; then
    shards_job=$(submit shards "" shards.sbatch synth --out "$shards")
fi
train=(data.train_shards="$shards" ${overrides[@]+"${overrides[@]}"})
teacher=$(submit teacher "$shards_job" teacher.sbatch --config "configs/teacher/$config_set.yaml" \
    out_dir="$out/teacher" "${train[@]}")
vq=$(submit vq "$shards_job" vq.sbatch --config "configs/vq/$config_set.yaml" out_dir="$out/vq" "${train[@]}")
submit eval-teacher "$teacher" eval.sbatch --model "$out/teacher/model" --shards "$shards" \
    --out "$out/eval/teacher" >/dev/null
for objective in scratch kd dckd; do
    after=$shards_job
    [ "$objective" != scratch ] && after="$teacher:$vq"
    student=$(submit "distill-$objective" "$after" distill.sbatch --config "configs/distill/$config_set.yaml" \
        objective="$objective" out_dir="$out/distill-$objective" teacher="$out/teacher/model" vq="$out/vq/model" "${train[@]}")
    submit "eval-distill-$objective" "$student" eval.sbatch --model "$out/distill-$objective/model" \
        --shards "$shards" --out "$out/eval/distill-$objective" >/dev/null
done

# Data-free: dream from the teacher alone (an array: each task writes its own shards), then distil a
# student on the dreamed inputs, and prune the teacher (calibrated on them) and distil it back.
dreamed=$out/dream-shards
dream=$(submit dream "$teacher" --array="0-$((dream_tasks - 1))" array.sbatch dream \
    --config "configs/dream/$config_set.yaml" out_dir="$dreamed" teacher="$out/teacher/model")
on_dreams=("${train[@]}" data.train_shards="$dreamed" data.eval_shards="$shards" teacher="$out/teacher/model")
student=$(submit distill-dream "$dream" distill.sbatch --config "configs/distill/$config_set-dream.yaml" \
    out_dir="$out/distill-dream" "${on_dreams[@]}")
submit eval-distill-dream "$student" eval.sbatch --model "$out/distill-dream/model" --shards "$shards" \
    --out "$out/eval/distill-dream" >/dev/null
pruned=$(submit prune "$dream" prune.sbatch --config "configs/prune/$config_set.yaml" out_dir="$out/prune" \
    network="$out/teacher/model" calib_shards="$dreamed")
submit eval-prune "$pruned" eval.sbatch --model "$out/prune/model" --shards "$shards" --out "$out/eval/prune" >/dev/null
student=$(submit distill-pruned "$pruned" distill.sbatch --config "configs/distill/$config_set-pruned.yaml" \
    out_dir="$out/distill-pruned" init="$out/prune/model" "${on_dreams[@]}")
submit eval-distill-pruned "$student" eval.sbatch --model "$out/distill-pruned/model" --shards "$shards" \
    --out "$out/eval/distill-pruned" >/dev/null
echo "submitted; when the evals are done: weatherkd report $out/eval/* --out $out/report.md" >&2
