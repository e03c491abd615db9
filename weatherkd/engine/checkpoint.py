"""Checkpoint directories: atomic, verified before they are trusted, rotated, and loaded without
unpickling code.

``checkpoints/step-XXXXXXX/`` holds:
- what accelerate's ``save_state`` writes: the model (safetensors, or DeepSpeed's per-rank
  shards), the optimizer and every process's RNG states. Under DeepSpeed each rank writes its
  own shards, so every rank calls it.
- ``engine_state.json`` + ``engine_state.safetensors``: the engine's own state (progress,
  scheduler, EMA, the recipe's state) as JSON and tensors. No pickle.
- ``MANIFEST.json``, written last: every file with its size and sha256. A directory only gets
  its final name once its manifest is written, and ``latest`` is only a pointer for people:
  resume takes the newest checkpoint whose manifest verifies and warns about any newer one.

Files that ``torch.load`` reads (accelerate's and DeepSpeed's) are scanned for pickled globals
before they are loaded, and then loaded with ``weights_only`` forced on: a checkpoint written by
someone else can hold tensors and plain data, never code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from weatherkd.engine import failpoints
from weatherkd.errors import UserError
from weatherkd.io import atomic_write_json, atomic_write_text, sha256_file
from weatherkd.logs import get_logger

log = get_logger(__name__)
LATEST = "latest"
MANIFEST = "MANIFEST.json"
STEP_DIR = re.compile(r"step-\d{7,}")
ENGINE_STATE = "engine_state"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


def _allowed_globals() -> list:
    """What torch.load may rebuild besides tensors and plain containers: numpy's generator
    state (accelerate's RNG files) and the plain-data classes DeepSpeed pickles into its
    optimizer shards. Each is a data holder: rebuilding one sets fields and calls nothing else."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    allowed = [np.dtype, np.ndarray, multiarray.multiarray._reconstruct, type(np.dtype(np.uint32))]
    if "deepspeed" in sys.modules:  # only a DeepSpeed run can be resuming a DeepSpeed checkpoint
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    return allowed


def _global_name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted: incomplete, corrupt, or holding pickled code."""


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def step_dirs(ckpt_root: Path) -> list[Path]:
    """``step-XXXXXXX`` directories, oldest first (anything else in the folder is not ours)."""
    return sorted((p for p in ckpt_root.glob("step-*") if p.is_dir() and STEP_DIR.fullmatch(p.name)), key=step_of)


# ---------------------------------------------------------------------------- state as JSON + tensors


def save_state_tree(state: dict, directory: Path, name: str = ENGINE_STATE) -> None:
    """Nested dicts/lists of tensors and plain values -> ``name.json`` + ``name.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj, key: str):
        if isinstance(obj, torch.Tensor):
            tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
            return {"__tensor__": key}
        if isinstance(obj, dict):
            bad = [k for k in obj if not isinstance(k, str)]
            if bad:
                raise TypeError(f"checkpoint state '{key}' has a non-string key {bad[0]!r}")
            return {k: encode(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [encode(v, f"{key}/{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"checkpoint state '{key}' is a {type(obj).__name__}: only tensors and plain data are "
                        "saved (a recipe's state_dict must not hold objects)")

    tree = encode(state, "")
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(tree))


def load_state_tree(directory: Path, name: str = ENGINE_STATE) -> dict:
    tensors = load_file(str(directory / f"{name}.safetensors"))

    def decode(obj):
        if isinstance(obj, dict):
            if set(obj) == {"__tensor__"}:
                return tensors[obj["__tensor__"]]
            return {k: decode(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        return obj

    return decode(json.loads((directory / f"{name}.json").read_text()))


# ---------------------------------------------------------------------------- writing


def save(accelerator, ckpt_root: Path, step: int, keep: int, engine_state: dict) -> Path:
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        save_state_tree(engine_state, tmp)
    accelerator.wait_for_everyone()
    failpoints.reached("checkpoint.state_written", step)
    if accelerator.is_main_process:
        write_manifest(tmp, step, accelerator.num_processes)
        # A checkpoint of the same step (a preemption right after a scheduled save, or a rerun)
        # is moved aside, not deleted, until the new one has its name: a kill in between leaves one.
        old = ckpt_root / f".{final.name}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        failpoints.reached("checkpoint.renamed", step)
        atomic_write_text(ckpt_root / LATEST, final.name + "\n")
        _rotate(ckpt_root, keep, current=final)
        log.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def write_manifest(directory: Path, step: int, world_size: int) -> None:
    files = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        with open(f, "rb") as fh:  # what the manifest vouches for must be on disk, not in a page cache
            os.fsync(fh.fileno())
        files[str(f.relative_to(directory))] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    atomic_write_json(directory / MANIFEST, {"format": 1, "step": step, "world_size": world_size, "files": files})


def _rotate(ckpt_root: Path, keep: int, current: Path) -> None:
    """Keep the newest ``keep`` complete checkpoints. ``current`` was just hashed from disk, so the
    newest checkpoint that verifies always survives; leftovers of killed writes go too."""
    complete = [p for p in step_dirs(ckpt_root) if (p / MANIFEST).is_file()]
    for old in complete[: max(0, len(complete) - max(keep, 1))]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in [*ckpt_root.glob(".step-*.tmp"), *ckpt_root.glob(".step-*.old")]:  # one run per out_dir
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------- verifying and choosing


def verify(path: Path) -> str | None:
    """None when every file the manifest lists is there with its size and hash; else what is wrong."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return f"it has no {MANIFEST} (an incomplete write, or a checkpoint of an older weatherkd)"
    try:
        files = json.loads(manifest_file.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{rel} is {size} bytes, the manifest says {want['bytes']}"
        if sha256_file(f) != want["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def choose(resume: str, ckpt_root: Path) -> Path | None:
    """The checkpoint to resume from. ``none``: start fresh. A path: that checkpoint, which must
    verify. ``auto``: the newest one that verifies, with a warning for each newer one that does
    not; fresh when there is none, an error naming the folder when none verifies."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"resume={resume}: no such checkpoint directory")
        problem = verify(path)
        if problem:
            raise CheckpointError(f"resume={resume}: the checkpoint does not verify: {problem}")
        return path
    for old in ckpt_root.glob(".step-*.old"):  # a replacement killed between its two renames
        if not (ckpt_root / old.name[1:-4]).exists():
            old.rename(ckpt_root / old.name[1:-4])
    found = step_dirs(ckpt_root)[::-1]
    if not found:
        if (ckpt_root / LATEST).is_file():
            raise CheckpointError(f"{ckpt_root / LATEST} names a checkpoint, but there is none under {ckpt_root}; "
                                  "remove the pointer to start fresh, or pass resume=PATH")
        return None
    problems = []
    for path in found:
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint %s does not verify (%s); trying an older one", path, problem)
        problems.append(f"{path.name}: {problem}")
    raise CheckpointError(f"no checkpoint under {ckpt_root} verifies ({'; '.join(problems)}); pass resume=none "
                          "to start over or resume=PATH")


# ---------------------------------------------------------------------------- loading without code


def refuse_pickled_code(path: Path) -> None:
    """Every file torch.load would read holds only tensors and plain data, or this raises."""
    allowed = {_global_name(g) for g in _allowed_globals()}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES):
        if not zipfile.is_zipfile(f):
            raise CheckpointError(f"{f} is not a torch archive; a checkpoint file is never unpickled as it is")
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except Exception as e:  # noqa: BLE001 -- a zip that is not a torch archive, or a broken one
            raise CheckpointError(f"{f} cannot be read as a torch archive ({type(e).__name__}: {e})") from None
        unsafe = sorted(set(found) - allowed)
        if unsafe:
            raise CheckpointError(f"{f} holds pickled {', '.join(unsafe)}: a checkpoint may hold only tensors and "
                                  "plain data, and loading this one could run code, so it is not loaded")


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` in the block runs with ``weights_only=True``, even where a library
    (accelerate's custom state, DeepSpeed's checkpoint engine) asks for ``False``."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def load(accelerator, path: Path) -> dict[str, Any]:
    """Load accelerate's part into the prepared objects; return the engine's own state. The
    caller has verified ``path`` and run ``refuse_pickled_code`` on it."""
    with weights_only_loads():
        try:
            accelerator.load_state(str(path))
        except Exception as e:  # noqa: BLE001 -- whatever the libraries raise, the cause is this folder
            if isinstance(e, UserError):
                raise
            raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:300]}") from e
    return load_state_tree(path)
