#!/bin/bash
# Follow-ups on the conv teacher (ev3): (a) kd with w_gt=0 at 1500 steps; (b) scratch and kd at 3000 steps. Seeds 0-2.
set -u
W=/work/exp/wt2; S=/work/exp/demo-clone/shards/demo; H=/work/exp/demo-clone/shards/demo-heldout; OUT=/work/exp/ev4; T=/work/exp/ev3
export PYTHONPATH=$W WANDB_MODE=offline
PY=/work/main/.venv/bin; cd $W; mkdir -p $OUT/logs
L() { $PY/accelerate launch --config_file launch/$1 --num_processes 2 -m weatherkd "${@:2}"; }
run() { name=$1; shift; [ -e "$OUT/$name/metrics.json" ] && return 0; s=$(date +%s)
  "$@" > $OUT/logs/$name.log 2>&1 || { echo "FAILED $name" >> $OUT/logs/status; exit 1; }
  echo "$name $(( $(date +%s) - s ))" >> $OUT/logs/status; }
KD="data.train_shards=$T/taught data.eval_shards=$S teacher=$T/cteacher/model"
for seed in 0 1 2; do
  run kdonly-s$seed L cpu-ddp.yaml distill --config configs/distill/demo.yaml objective=kd w_gt=0 out_dir=$OUT/kdonly-s$seed $KD seed=$seed \
    train.max_steps=1500 train.eval_every=500 ckpt.every=500 tracker.kind=none
done
M=""; for r in kdonly; do for s in 0 1 2; do M="$M $OUT/$r-s$s/model"; done; done
L cpu-ddp.yaml eval --model $M --shards $S --out $OUT/eval --tracker none > $OUT/logs/eval.log 2>&1 || exit 1
echo done >> $OUT/logs/status
