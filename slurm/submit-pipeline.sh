#!/usr/bin/env bash
# Submit the whole pipeline as SLURM jobs chained with --dependency=afterok, from the repository root:
#
#   shards ─┬─> teacher ─┬─> distill-kd ───> eval-distill-kd
#           ├─> vq ──────┴─> distill-dckd ─> eval-distill-dckd
#           └─> distill-scratch ───────────> eval-distill-scratch
#               teacher ───────────────────> eval-teacher
#
#   slurm/submit-pipeline.sh [--out runs/pipeline] [--shards shards/demo] [--config-set demo]
#                            [--hold] [--sbatch-arg ARG]... [-- key=value ...]
#
# --config-set NAME uses configs/teacher/NAME.yaml, configs/vq/NAME.yaml and
# configs/distill/NAME-{scratch,kd,dckd}.yaml. --sbatch-arg is passed to every sbatch (partition,
# account, or sizes). key=value after -- go to every training stage. --hold submits held
# (release with `scontrol release JOBID`). The shards job is skipped when the set exists.
# Prints one line per job (stage, job id) and writes them to OUT/slurm-jobs.tsv.
set -euo pipefail
shopt -s inherit_errexit  # a failing sbatch inside $(submit ...) must stop the script

out=runs/pipeline shards=shards/demo config_set=demo hold=() extra=() overrides=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --shards) shards=$2; shift 2 ;;
        --config-set) config_set=$2; shift 2 ;;
        --hold) hold=(--hold); shift ;;
        --sbatch-arg) extra+=("$2"); shift 2 ;;
        --) shift; overrides=("$@"); break ;;
        *) echo "submit-pipeline: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
    esac
done
[ -f slurm/common.sh ] || { echo "submit-pipeline: run from the repository root" >&2; exit 2; }
for f in configs/teacher/$config_set.yaml configs/vq/$config_set.yaml configs/distill/$config_set-{scratch,kd,dckd}.yaml; do
    [ -f "$f" ] || { echo "submit-pipeline: $f not found (--config-set $config_set)" >&2; exit 2; }
done
mkdir -p "$out" slurm/logs
jobs_file=$out/slurm-jobs.tsv
: >"$jobs_file"

# submit NAME AFTER TEMPLATE ARGS... -> prints the job id; AFTER is a colon-separated id list or ""
submit() {
    local name=$1 after=$2 template=$3
    shift 3
    local dep=()
    [ -n "$after" ] && dep=(--dependency="afterok:$after" --kill-on-invalid-dep=yes)
    local id
    id=$(sbatch --parsable ${hold[@]+"${hold[@]}"} ${dep[@]+"${dep[@]}"} --job-name="wkd-$name" \
        ${extra[@]+"${extra[@]}"} "slurm/$template" "$@")
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
    student=$(submit "distill-$objective" "$after" distill.sbatch --config "configs/distill/$config_set-$objective.yaml" \
        out_dir="$out/distill-$objective" teacher="$out/teacher/model" vq="$out/vq/model" "${train[@]}")
    submit "eval-distill-$objective" "$student" eval.sbatch --model "$out/distill-$objective/model" \
        --shards "$shards" --out "$out/eval/distill-$objective" >/dev/null
done
echo "submitted; when the evals are done: weatherkd report $out/eval/* --out $out/report.md" >&2
