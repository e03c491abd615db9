#!/bin/bash
# The scratch students of section 3 and the kd students of section 4, as they ran (one after another,
# a 2-core EPYC). W: a worktree of fe8293f; S: `weatherkd shards synth --out S`; T: the same with
# `--texture-fraction 0.3`; S-heldout: `weatherkd shards heldout --out S-heldout`; OUT: outputs.
set -u
W=${W:?worktree}; S=${S:?shard set}; T=${T:?textured set}; OUT=${OUT:?output folder}
export PYTHONPATH=$W WANDB_MODE=offline; cd "$W"
evaluate() { for set in "$S" "$S-heldout"; do
  weatherkd eval --model "$1/model" --shards "$set" --out "$OUT/eval-$(basename "$set")/$(basename "$1")" --tracker none; done; }
for seed in 0 1 2; do for set in "$S" "$T"; do
  run=$OUT/$(basename "$set")-s$seed
  accelerate launch --config_file launch/cpu-ddp.yaml --num_processes 2 -m weatherkd distill \
    --config configs/distill/demo.yaml objective=scratch out_dir="$run" seed=$seed \
    data.train_shards="$set" data.eval_shards="$S" tracker.kind=none
  evaluate "$run"
done; done
# kd from the `small` teacher of probes.sh (small-bn-l1-ssim-noclip-sl), through its cached outputs
TEACHER=${TEACHER:?the small teacher\'s model folder}
accelerate launch --config_file launch/cpu-ddp.yaml --num_processes 2 -m weatherkd cache-teacher \
  --config configs/cache-teacher/demo.yaml out_dir="$OUT/taught" teacher="$TEACHER" shards="$S"
for seed in 0 1 2; do
  accelerate launch --config_file launch/cpu-ddp.yaml --num_processes 2 -m weatherkd distill \
    --config configs/distill/demo.yaml objective=kd teacher="$TEACHER" out_dir="$OUT/kd-s$seed" seed=$seed \
    data.train_shards="$OUT/taught" data.eval_shards="$S" tracker.kind=none
  evaluate "$OUT/kd-s$seed"
done
# Rows are named after the run folders (here: demo, tex, kd). In the committed reports the grain's seed 0
# came from a folder named `scratch`, so its row is `scratch` and the diff was --diff scratch:demo.
weatherkd report "$OUT"/eval-$(basename "$S")/* --diff tex:demo --diff kd:demo --out "$OUT/report.md" --tracker none
