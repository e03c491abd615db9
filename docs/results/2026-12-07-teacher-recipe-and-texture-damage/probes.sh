#!/bin/bash
# The teacher probes of 2026-12-07-teacher-recipe-and-texture-damage.md, as they ran one after
# another on a 2-core EPYC: `configs/teacher/demo.yaml` for 1000 steps, seed 0, under ZeRO-2 on
# 2 CPU processes, with one set of overrides each; then `weatherkd eval` on the test split and
# the held-out set. W: a worktree of fe8293f; S: `weatherkd shards synth --out S` (defaults),
# S-heldout: `weatherkd shards heldout --out S-heldout`.
set -u
W=${W:?worktree}; S=${S:?shard set}; OUT=${OUT:?output folder}
export PYTHONPATH=$W WANDB_MODE=offline
cd "$W"; mkdir -p "$OUT/logs"
run() { name=$1; shift; [ -e "$OUT/$name/model/model.json" ] && return 0; s=$(date +%s)
  accelerate launch --config_file launch/cpu-zero2.yaml --num_processes 2 -m weatherkd teacher \
    --config configs/teacher/demo.yaml out_dir="$OUT/$name" data.train_shards="$S" tracker.kind=none \
    stats.batches=0 "$@" > "$OUT/logs/$name.log" 2>&1
  echo "$name $(( $(date +%s) - s )) $(grep 'validation at step' "$OUT/logs/$name.log" | tail -1 | sed 's/.*PSNR/PSNR/')" >> "$OUT/logs/status"
  for set in "$S" "$S-heldout"; do
    weatherkd eval --model "$OUT/$name/model" --shards "$set" --out "$OUT/eval-$(basename "$set")/$name" --tracker none
  done; }
# BatchNorm in the decoder, L1 + SSIM 0.2, no PSNR term; NOCLIP: without the text and CLIP-SRD losses
B="model.kwargs.decoder_norm=batch train.lr=5e-4 loss.pixel=l1 loss.w_ssim=0.2 loss.w_psnr=0"
NOCLIP="loss.w_text=0 loss.w_srd=0"
SL="data.cutmix_prob=0 train.grad_clip=0 train.ema_decay=0.99"   # the students' settings
run bn-l1-ssim-noclip $B $NOCLIP loss.w_keep=0
run bn-l1-ssim-noclip-keep1 $B $NOCLIP loss.w_keep=1
run demo-noclip $NOCLIP
run bn-l1-ssim-noclip-2k $B $NOCLIP loss.w_keep=0 train.max_steps=2000 train.eval_every=500
run bn-l1-ssim-noclip-sl $B $NOCLIP loss.w_keep=0 $SL
run bn-l1-ssim-noclip-sl-c96b4 $B $NOCLIP loss.w_keep=0 $SL data.crop=96 data.batch_size=4
run small-bn-l1-ssim-noclip-sl $B $NOCLIP loss.w_keep=0 $SL model.size=small
