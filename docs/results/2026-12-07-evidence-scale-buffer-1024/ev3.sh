#!/bin/bash
# Control: a conv teacher (unet_bn base, 0.53M params, trained on ground truth like the scratch
# student, 3000 steps) and kd students from it at 1500 steps, seeds 0-2; scratch rows are ev2's.
set -u
W=/work/exp/wt2; S=/work/exp/demo-clone/shards/demo; H=/work/exp/demo-clone/shards/demo-heldout; OUT=/work/exp/ev3
export PYTHONPATH=$W WANDB_MODE=offline
PY=/work/main/.venv/bin; cd $W; mkdir -p $OUT/logs
while ! grep -q done /work/exp/tp/times 2>/dev/null; do sleep 20; done
L() { $PY/accelerate launch --config_file launch/$1 --num_processes 2 -m weatherkd "${@:2}"; }
run() { name=$1; shift; [ -e "$OUT/$name/metrics.json" ] && return 0; s=$(date +%s)
  "$@" > $OUT/logs/$name.log 2>&1 || { echo "FAILED $name" >> $OUT/logs/status; exit 1; }
  echo "$name $(( $(date +%s) - s ))" >> $OUT/logs/status; }
run cteacher L cpu-ddp.yaml distill --config configs/distill/demo.yaml objective=scratch model.size=base out_dir=$OUT/cteacher \
  data.train_shards=$S train.max_steps=3000 train.eval_every=1000 ckpt.every=1000 tracker.kind=none
[ -e $OUT/taught/manifest.json ] || { L cpu-ddp.yaml cache-teacher --config configs/cache-teacher/demo.yaml out_dir=$OUT/taught teacher=$OUT/cteacher/model shards=$S > $OUT/logs/cache.log 2>&1 || exit 1; }
for seed in 0 1 2; do
  run kd-s$seed L cpu-ddp.yaml distill --config configs/distill/demo.yaml objective=kd out_dir=$OUT/kd-s$seed \
    data.train_shards=$OUT/taught data.eval_shards=$S teacher=$OUT/cteacher/model seed=$seed \
    train.max_steps=1500 train.eval_every=500 ckpt.every=500 tracker.kind=none
done
M="$OUT/cteacher/model $OUT/kd-s0/model $OUT/kd-s1/model $OUT/kd-s2/model"
for pair in "eval $S" "eval-heldout $H"; do set -- $pair
  [ -e $OUT/$1/kd-s2/metrics.json ] || L cpu-ddp.yaml eval --model $M --shards $2 --out $OUT/$1 --tracker none > $OUT/logs/$1.log 2>&1 || exit 1
done
echo done >> $OUT/logs/status
