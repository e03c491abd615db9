#!/bin/bash
# Evidence-scale teacher (3000 steps, crop 96, w_keep 0.1) and scratch/kd/dckd students at 1500 steps,
# seeds 0-2, shuffle buffer 1024 (the default). Resumable: rerun to continue (finished stages skipped).
set -u
W=/work/exp/wt; S=/work/exp/demo-clone/shards/demo; H=/work/exp/demo-clone/shards/demo-heldout; OUT=/work/exp/ev2
export PYTHONPATH=$W WANDB_MODE=offline
PY=/work/main/.venv/bin; cd $W; mkdir -p $OUT/logs
L() { $PY/accelerate launch --config_file launch/$1 --num_processes 2 -m weatherkd "${@:2}"; }
run() { name=$1; shift; [ -e "$OUT/$name/metrics.json" ] && return 0; s=$(date +%s)
  "$@" > $OUT/logs/$name.log 2>&1 || { echo "FAILED $name" >> $OUT/logs/status; exit 1; }
  echo "$name $(( $(date +%s) - s ))" >> $OUT/logs/status; }
run teacher L cpu-zero2.yaml teacher --config configs/teacher/demo.yaml out_dir=$OUT/teacher data.train_shards=$S tracker.kind=none \
  train.max_steps=3000 train.eval_every=1000 ckpt.every=500 data.crop=96 loss.w_keep=0.1
[ -e $OUT/taught/manifest.json ] || { L cpu-ddp.yaml cache-teacher --config configs/cache-teacher/demo.yaml out_dir=$OUT/taught teacher=$OUT/teacher/model shards=$S > $OUT/logs/cache.log 2>&1 || exit 1; }
run vq L cpu-ddp.yaml vq --config configs/vq/demo.yaml out_dir=$OUT/vq data.train_shards=$S tracker.kind=none
ST="train.max_steps=1500 train.eval_every=500 ckpt.every=500 tracker.kind=none"
for seed in 0 1 2; do
  run scratch-s$seed L cpu-ddp.yaml distill --config configs/distill/demo.yaml objective=scratch out_dir=$OUT/scratch-s$seed data.train_shards=$S seed=$seed $ST
  for obj in kd dckd; do
    run $obj-s$seed L cpu-ddp.yaml distill --config configs/distill/demo.yaml objective=$obj out_dir=$OUT/$obj-s$seed \
      data.train_shards=$OUT/taught data.eval_shards=$S teacher=$OUT/teacher/model vq=$OUT/vq/model seed=$seed $ST
  done
done
M="$OUT/teacher/model"; for r in scratch kd dckd; do for s in 0 1 2; do M="$M $OUT/$r-s$s/model"; done; done
for pair in "eval $S" "eval-heldout $H"; do set -- $pair
  [ -e $OUT/$1/dckd-s2/metrics.json ] || L cpu-ddp.yaml eval --model $M --shards $2 --out $OUT/$1 --tracker none > $OUT/logs/$1.log 2>&1 || exit 1
done
echo done >> $OUT/logs/status
