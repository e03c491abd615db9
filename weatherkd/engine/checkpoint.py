"""Checkpoint directories: atomic, rotated, with a ``latest`` pointer that only ever names a complete one.

Accelerate's ``save_state`` writes model, optimizer, scaler, every process's
RNG states and every object registered with ``register_for_checkpointing``
(scheduler, EMA, progress, stage state). Under DeepSpeed each rank writes its
own shards, so every rank must call it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from weatherkd.errors import UserError
from weatherkd.io import atomic_write_text
from weatherkd.logs import get_logger

log = get_logger(__name__)
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def save(accelerator, ckpt_root: Path, step: int, keep: int) -> Path:
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(ckpt_root / LATEST, final.name + "\n")
        _rotate(ckpt_root, keep)
        log.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _rotate(ckpt_root: Path, keep: int) -> None:
    done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def latest(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text().strip()
    if not path.is_dir():
        raise UserError(f"{pointer} names {path.name}, which does not exist; remove the pointer or pass resume=PATH")
    return path


def resolve(resume: str, ckpt_root: Path) -> Path | None:
    """``auto``: the latest checkpoint if any; ``none``: start fresh; otherwise a checkpoint directory."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest(ckpt_root)
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"resume={resume}: no such checkpoint directory")
    return path
