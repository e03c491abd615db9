#!/bin/bash
# kd (from the small BN teacher, cached) and scratch students at 3000 steps, seeds 0-2, default (pre-grain) set
set -u
W=/work/exp/wt4; export PYTHONPATH=$W WANDB_MODE=offline; PY=/work/main/.venv/bin; cd $W
T=/work/exp/p19/small-bn-l1-ssim-noclip-sl/model; O=/work/exp/kd3k; mkdir -p $O; S=/work/exp/shards/demo
L="train.max_steps=3000 train.eval_every=1000 ckpt.every=1000"
for seed in 0 1 2; do
  for obj in scratch kd; do
    R=$O/$obj-s$seed
    if [ $obj = kd ]; then X="teacher=$T data.train_shards=/work/exp/kdsmall/taught data.eval_shards=$S"; else X="data.train_shards=$S"; fi
    [ -e $R/model/model.json ] || $PY/accelerate launch --config_file launch/cpu-ddp.yaml --num_processes 2 -m weatherkd distill --config configs/distill/demo.yaml objective=$obj out_dir=$R seed=$seed $X $L tracker.kind=none > $R.log 2>&1
    for s in demo demo-heldout; do [ -e $O/eval-$s/$obj-s$seed/metrics.json ] || $PY/weatherkd eval --model $R/model --shards /work/exp/shards/$s --out $O/eval-$s/$obj-s$seed --tracker none > $R-eval-$s.log 2>&1; done
  done
done
echo done > $O/done
