"""What a resumed run may change in its config.

A resume continues the run its checkpoint belongs to. Keys that only extend or watch it may change
freely: more steps, the log, validation and checkpoint cadence, the tracker, loader workers, what
validation reads. Any other change (model, objective, losses and their weights, optimiser, learning
rate and schedule, data, teacher, seed) would make the run's record describe steps it did not
take, so it is refused unless ``resume_allow_changes=true``; whatever is allowed is appended to
``out_dir/config_history.json`` with the step it took effect at.
"""

from __future__ import annotations

import json
from pathlib import Path

from weatherkd import config as cfgmod
from weatherkd.errors import UserError
from weatherkd.io import atomic_write_json

HISTORY = "config_history.json"

# Dotted keys, or prefixes ending in ".", that extend or watch a run without changing what it is.
WATCHING = ("out_dir", "resume", "resume_allow_changes", "train.max_steps", "train.log_every", "train.eval_every",
            "train.max_nonfinite_steps", "ckpt.", "tracker.", "data.num_workers", "data.eval_shards",
            "data.eval_split", "data.eval_max_samples")


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and not k.endswith("kwargs"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changes(saved: dict, now: dict) -> dict[str, tuple]:
    """``{dotted key: (saved value, new value)}`` for every key whose value differs."""
    a, b = flatten(saved), flatten(now)
    missing = object()
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)}


def with_defaults(cls, saved: dict) -> dict:
    """``saved`` as this code reads it: a key added to ``cls`` since the run was saved takes its
    default, which is, by the rule for adding keys, what the code did before the key existed.
    A saved config this code cannot read (a key removed since) is compared as it is."""
    try:
        return cfgmod.to_dict(cfgmod.build_unchecked(cls, saved))
    except UserError:
        return saved


def defining(diff: dict) -> list[str]:
    """The changed keys that change what the run is."""
    return [k for k in diff if not any(k == w or (w.endswith(".") and k.startswith(w)) for w in WATCHING)]


def short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_saved(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return cfgmod.parse_yaml(path.read_text(), str(path)) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def record_changes(out_dir: Path, step: int, diff: dict) -> None:
    path = Path(out_dir) / HISTORY
    history = json.loads(path.read_text()) if path.is_file() else []
    history.append({"step": step, "changes": {k: {"from": a, "to": b} for k, (a, b) in diff.items()},
                    "defining": defining(diff)})
    atomic_write_json(path, history)
