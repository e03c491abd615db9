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
#   with an SD path (D4IR):
#           shards ──> adapter ─┬─> synth (array) ─> distill-d4ir ─> eval-distill-d4ir
#                     teacher ──┘
#
#   slurm/submit-pipeline.sh [--out runs/pipeline] [--shards shards/demo] [--eval-shards DIR] [--config-set demo]
#                            [--dream-tasks 2] [--sd-path DIR] [--synth-tasks 2] [--hold]
#                            [--sbatch-arg ARG]... [-- key=value ...]
#
# --config-set NAME uses configs/{teacher,vq,dream,prune}/NAME.yaml and
# configs/distill/NAME{,-dream,-pruned}.yaml; every configs/distill/NAME-student-X.yaml is one more
# student, trained with every objective as distill-X-{scratch,kd,dckd}. The D4IR branch
# (configs/{adapter,synth}/NAME.yaml) runs when --sd-path is given or the synth config sets sd_path.
# --eval-shards (default: --shards) is the set validation and the evals score, with its test split.
# --dream-tasks / --synth-tasks set the array sizes (each task writes its own slice).
# --sbatch-arg is passed to every sbatch (partition, account, or sizes). key=value after -- go to
# every training stage. --hold submits held (release with `scontrol release JOBID`). The shards job
# (the embedded default set) is skipped when the set exists: ingest a real one first (docs/real-job.md).
# Prints one line per job (stage, job id) and writes them to OUT/slurm-jobs.tsv.
set -euo pipefail
shopt -s inherit_errexit  # a failing sbatch inside $(submit ...) must stop the script

out=runs/pipeline shards=shards/demo eval_shards="" config_set=demo dream_tasks=2 synth_tasks=2 sd_path="" hold=() extra=() overrides=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --shards) shards=$2; shift 2 ;;
        --eval-shards) eval_shards=$2; shift 2 ;;
        --config-set) config_set=$2; shift 2 ;;
        --dream-tasks) dream_tasks=$2; shift 2 ;;
        --synth-tasks) synth_tasks=$2; shift 2 ;;
        --sd-path) sd_path=$2; shift 2 ;;
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
for n in "$dream_tasks" "$synth_tasks"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "submit-pipeline: --dream-tasks/--synth-tasks must be positive integers" >&2; exit 2; }
done
# D4IR runs when an SD folder is given, or the set's synth config names one.
d4ir=""
configured_sd=$(sed -n 's/^sd_path:[[:space:]]*//p' "configs/synth/$config_set.yaml" 2>/dev/null | sed 's/[[:space:]]*#.*//')
case "$configured_sd" in ""|'""'|"''"|null|"~") configured_sd="" ;; esac
if [ -n "$sd_path" ] || [ -n "$configured_sd" ]; then
    for f in configs/{adapter,synth}/$config_set.yaml; do
        [ -f "$f" ] || { echo "submit-pipeline: $f not found (D4IR with --config-set $config_set)" >&2; exit 2; }
    done
    d4ir=1
fi
eval_shards=${eval_shards:-$shards}
if [ "$config_set" != demo ]; then  # only the demo set is built here; a real one is ingested first
    for set in "$shards" "$eval_shards"; do
        [ -f "$set/manifest.json" ] || { echo "submit-pipeline: $set is not a shard set; ingest it first" \
            "(docs/real-job.md), or pass --shards/--eval-shards" >&2; exit 2; }
    done
fi
mkdir -p "$out" slurm/logs
# Every job of this pipeline logs to one W&B group (sbatch passes the environment on); a rerun
# into the same --out joins it.
[ -f "$out/pipeline_id" ] || echo "$(basename "$out")-$(date +%Y%m%d-%H%M%S)" >"$out/pipeline_id"
export WEATHERKD_PIPELINE=${WEATHERKD_PIPELINE:-$(cat "$out/pipeline_id")}
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
train=(data.train_shards="$shards" data.eval_shards="$eval_shards" ${overrides[@]+"${overrides[@]}"})
teacher=$(submit teacher "$shards_job" teacher.sbatch --config "configs/teacher/$config_set.yaml" \
    out_dir="$out/teacher" "${train[@]}")
vq=$(submit vq "$shards_job" vq.sbatch --config "configs/vq/$config_set.yaml" out_dir="$out/vq" "${train[@]}")
submit eval-teacher "$teacher" eval.sbatch --model "$out/teacher/model" --shards "$eval_shards" \
    --out "$out/eval/teacher" >/dev/null
students=("configs/distill/$config_set.yaml")
for f in configs/distill/"$config_set"-student-*.yaml; do [ -f "$f" ] && students+=("$f"); done
for config in "${students[@]}"; do
    prefix=distill-
    [[ $config == *-student-* ]] && { prefix=${config##*-student-}; prefix=distill-${prefix%.yaml}-; }
    for objective in scratch kd dckd; do
        after=$shards_job
        [ "$objective" != scratch ] && after="$teacher:$vq"
        name=$prefix$objective
        student=$(submit "$name" "$after" distill.sbatch --config "$config" objective="$objective" \
            out_dir="$out/$name" teacher="$out/teacher/model" vq="$out/vq/model" "${train[@]}")
        submit "eval-$name" "$student" eval.sbatch --model "$out/$name/model" --shards "$eval_shards" \
            --out "$out/eval/$name" >/dev/null
    done
done

# Data-free: dream from the teacher alone (an array: each task writes its own shards), then distil a
# student on the dreamed inputs, and prune the teacher (calibrated on them) and distil it back.
dreamed=$out/dream-shards
dream=$(submit dream "$teacher" --array="0-$((dream_tasks - 1))" array.sbatch dream \
    --config "configs/dream/$config_set.yaml" out_dir="$dreamed" teacher="$out/teacher/model")
on_dreams=("${train[@]}" data.train_shards="$dreamed" data.eval_shards="$eval_shards" teacher="$out/teacher/model")
student=$(submit distill-dream "$dream" distill.sbatch --config "configs/distill/$config_set-dream.yaml" \
    out_dir="$out/distill-dream" "${on_dreams[@]}")
submit eval-distill-dream "$student" eval.sbatch --model "$out/distill-dream/model" --shards "$eval_shards" \
    --out "$out/eval/distill-dream" >/dev/null
pruned=$(submit prune "$dream" prune.sbatch --config "configs/prune/$config_set.yaml" out_dir="$out/prune" \
    network="$out/teacher/model" calib_shards="$dreamed")
submit eval-prune "$pruned" eval.sbatch --model "$out/prune/model" --shards "$eval_shards" --out "$out/eval/prune" >/dev/null
student=$(submit distill-pruned "$pruned" distill.sbatch --config "configs/distill/$config_set-pruned.yaml" \
    out_dir="$out/distill-pruned" init="$out/prune/model" "${on_dreams[@]}")
submit eval-distill-pruned "$student" eval.sbatch --model "$out/distill-pruned/model" --shards "$eval_shards" \
    --out "$out/eval/distill-pruned" >/dev/null

# D4IR: the adapter learns weather prompts from the degraded inputs; SD img2img synthesises weather
# onto clean photos (an array), with the teacher's output cached; a student is distilled on them.
if [ -n "$d4ir" ]; then
    synthesised=$out/d4ir-shards
    adapter=$(submit adapter "$shards_job" adapter.sbatch --config "configs/adapter/$config_set.yaml" \
        out_dir="$out/adapter" "${train[@]}")
    sd=()
    [ -n "$sd_path" ] && sd=(sd_path="$sd_path")
    synth=$(submit synth "$adapter:$teacher" --array="0-$((synth_tasks - 1))" array.sbatch synth \
        --config "configs/synth/$config_set.yaml" out_dir="$synthesised" adapter="$out/adapter/model" \
        teacher="$out/teacher/model" ${sd[@]+"${sd[@]}"})
    student=$(submit distill-d4ir "$synth" distill.sbatch --config "configs/distill/$config_set.yaml" \
        objective=kd out_dir="$out/distill-d4ir" teacher="$out/teacher/model" "${train[@]}" \
        data.train_shards="$synthesised" data.eval_shards="$eval_shards")
    submit eval-distill-d4ir "$student" eval.sbatch --model "$out/distill-d4ir/model" --shards "$eval_shards" \
        --out "$out/eval/distill-d4ir" >/dev/null
fi
echo "submitted; when the evals are done: weatherkd report $out/eval/* --out $out/report.md" >&2
