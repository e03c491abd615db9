#!/bin/bash
# scratch and kd (conv teacher) at 3000 steps, seeds 0-2, interleaved.
set -u
W=/work/exp/wt2; S=/work/exp/demo-clone/shards/demo; OUT=/work/exp/ev5; T=/work/exp/ev3
export PYTHONPATH=$W WANDB_MODE=offline
PY=/work/main/.venv/bin; cd $W; mkdir -p $OUT/logs
L() { $PY/accelerate launch --config_file launch/$1 --num_processes 2 -m weatherkd "${@:2}"; }
run() { name=$1; shift; [ -e "$OUT/$name/metrics.json" ] && return 0; s=$(date +%s)
  "$@" > $OUT/logs/$name.log 2>&1 || { echo "FAILED $name" >> $OUT/logs/status; exit 1; }
  echo "$name $(( $(date +%s) - s ))" >> $OUT/logs/status; }
KD="data.train_shards=$T/taught data.eval_shards=$S teacher=$T/cteacher/model"
L3="train.max_steps=3000 train.eval_every=1000 ckpt.every=1000 tracker.kind=none"
for seed in 0 1 2; do
  run scratch3k-s$seed L cpu-ddp.yaml distill --config configs/distill/demo.yaml objective=scratch out_dir=$OUT/scratch3k-s$seed data.train_shards=$S seed=$seed $L3
  run kd3k-s$seed L cpu-ddp.yaml distill --config configs/distill/demo.yaml objective=kd out_dir=$OUT/kd3k-s$seed $KD seed=$seed $L3
done
M=""; for r in scratch3k kd3k; do for s in 0 1 2; do M="$M $OUT/$r-s$s/model"; done; done
L cpu-ddp.yaml eval --model $M --shards $S --out $OUT/eval --tracker none > $OUT/logs/eval.log 2>&1 || exit 1
echo done >> $OUT/logs/status
