#!/bin/bash
# The teacher probes of 2026-12-07-teacher-decoder-norm.md, as they ran (one after another, on a
# 2-core EPYC): `configs/teacher/demo.yaml` for 1000 steps, seed 0, under ZeRO-2 on 2 CPU processes,
# with one set of overrides each. W: a worktree of the commit (88a84d0 for the first five, which
# need no decoder_norm; 31af797 for the rest); S: `weatherkd shards synth --out S` (defaults).
set -u
W=${W:?worktree}; S=${S:?shard set}; OUT=${OUT:?output folder}
export PYTHONPATH=$W WANDB_MODE=offline
cd "$W"; mkdir -p "$OUT/logs"
run() { name=$1; shift; [ -e "$OUT/$name/model/model.json" ] && return 0
  accelerate launch --config_file launch/cpu-zero2.yaml --num_processes 2 -m weatherkd teacher \
    --config configs/teacher/demo.yaml train.lr=2.0e-3 out_dir="$OUT/$name" data.train_shards="$S" \
    tracker.kind=none stats.batches=0 "$@" > "$OUT/logs/$name.log" 2>&1
  echo "$name $(grep 'validation at step' "$OUT/logs/$name.log" | tail -1 | sed 's/.*PSNR/PSNR/')" >> "$OUT/logs/status"; }
NOKEEP="loss.w_ssim=0 loss.w_psnr=0 loss.w_keep=0"
run l1pure loss.pixel=l1 $NOKEEP
run l1keep1 loss.pixel=l1 loss.w_ssim=0 loss.w_psnr=0 loss.w_keep=1
run ssim-only-keep0 loss.w_keep=0
run unet-l1 model.arch=unet_bn model.size=base loss.pixel=l1 $NOKEEP loss.w_text=0 loss.w_srd=0
run crop128-b2 data.crop=128 data.batch_size=2
BN="model.kwargs.decoder_norm=batch"
run bn-lr5e-4 $BN train.lr=5e-4
run ema train.ema_decay=0.99
run bn-lr5e-4-ema $BN train.lr=5e-4 train.ema_decay=0.99
run bn-lr1e-3 $BN train.lr=1e-3
run bn-l1 $BN train.lr=5e-4 loss.pixel=l1 $NOKEEP
run bn-l1-ssim $BN train.lr=5e-4 loss.pixel=l1 loss.w_ssim=0.2 loss.w_psnr=0 loss.w_keep=0
run bn-l1-lr1e-3 $BN train.lr=1e-3 loss.pixel=l1 $NOKEEP
run bn-l1-2k $BN train.lr=1e-3 loss.pixel=l1 $NOKEEP train.max_steps=2000 train.eval_every=500
run bn-l1-studentlike $BN train.lr=5e-4 loss.pixel=l1 $NOKEEP data.cutmix_prob=0 train.grad_clip=0 train.ema_decay=0.99
run bn-l1-ssim-keep0.3 $BN train.lr=5e-4 loss.pixel=l1 loss.w_ssim=0.2 loss.w_psnr=0 loss.w_keep=0.3
# The scratch student for scale, and `weatherkd eval` on the test split and the held-out set
# (`weatherkd shards heldout --out S-heldout`), then `weatherkd report` on the eval folders.
accelerate launch --config_file launch/cpu-ddp.yaml --num_processes 2 -m weatherkd distill \
  --config configs/distill/demo.yaml objective=scratch out_dir="$OUT/scratch" data.train_shards="$S" tracker.kind=none
for set in "$S" "$S-heldout"; do
  weatherkd eval --model "$OUT"/{bn-l1-ssim,bn-l1,bn-lr1e-3,bn-l1-ssim-keep0.3,scratch}/model --shards "$set" \
    --out "$OUT/eval-$(basename "$set")" --tracker none
done
