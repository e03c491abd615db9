"""Typed stage configs: dataclasses loaded from YAML plus ``dotted.key=value`` overrides.

Validation is strict on purpose. A typo in a 1000-GPU job's config should fail
on the login node, naming the key, the file and the closest valid key, rather
than silently training with a default.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from weatherkd.errors import UserError

CANONICAL_WEATHERS = ["rain_haze", "raindrop", "snow"]


class ConfigError(UserError):
    """A config file or override is invalid; the message names the key and its source."""


# ---------------------------------------------------------------------------
# Shared sections: defined once, used by every stage.
# ---------------------------------------------------------------------------


@dataclass
class DataConfig:
    train_shards: str = "shards/demo"  # shard-set directory (or a list file of tar paths)
    eval_shards: Optional[str] = None  # defaults to train_shards' test split
    train_split: str = "train"
    eval_split: str = "test"
    weathers: list[str] = field(default_factory=lambda: list(CANONICAL_WEATHERS))
    crop: int = 64
    batch_size: int = 8
    eval_max_samples: int = 0  # 0: the whole eval split (evaluated one full-size image at a time)
    num_workers: int = 2
    # Samples shuffled across before batching. A shard holds one weather (`shards synth` writes
    # 128-sample shards per weather), so a buffer of two shards' worth made batches of mostly one
    # weather: with 1024 against 256, scratch students at 1000 steps gained +1.0 dB mean on the
    # test split over three seeds (+0.04 to +1.88) and none stalled; held out they lost 1 dB, the
    # same trade as every other lever (docs/results/2026-12-07-shuffle-buffer.md). Samples are held decoded:
    # 1024 of the demo's 96-px pairs take 57 MB per loader worker.
    shuffle_buffer: int = 1024
    flip: bool = True
    cutmix_prob: float = 0.0  # Tan et al. 2024 §III-D (docs/references.md): mix patches across weathers
    cutmix_max_frac: float = 0.5


@dataclass
class TrainConfig:
    max_steps: int = 1000
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["constant", "cosine", "linear", "step"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine/linear: the floor, as a fraction of lr
    decay_every: int = 0  # step: multiply the lr by decay_factor every this many steps (Tan et al. halve it)
    decay_factor: float = 0.5
    grad_accum: int = 1
    grad_clip: float = 0.0  # 0 disables clipping
    # Steps whose loss or gradient norm is not finite are skipped (engine.nonfinite); a run that
    # skips more than this many stops with an error and writes nothing more.
    max_nonfinite_steps: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    channels_last: bool = False
    compile: bool = False
    ema_decay: float = 0.0  # 0 disables the EMA of trained weights
    eval_every: int = 0  # 0: only at the end
    log_every: int = 10


@dataclass
class CkptConfig:
    every: int = 500
    keep: int = 2
    # Steps between preemption checks. Each check is one tiny all-reduce and a host sync, so
    # checking every step would stall GPU pipelines; SLURM signals arrive minutes early anyway.
    preempt_check_every: int = 10


@dataclass
class TrackerConfig:
    kind: Literal["wandb", "none"] = "wandb"
    project: str = "weatherkd"
    name: Optional[str] = None  # default: "<pipeline>/<out_dir name>", with the stage in it
    # The W&B group all runs of one pipeline share; default: $WEATHERKD_PIPELINE, which
    # `weatherkd demo` and slurm/submit-pipeline.sh set for every stage they start.
    group: Optional[str] = None
    # auto: online when a W&B API key is configured, offline (under out_dir) otherwise.
    mode: Literal["auto", "online", "offline"] = "auto"
    tags: list[str] = field(default_factory=list)
    images_every_eval: bool = True


@dataclass
class ModelConfig:
    arch: str = ""
    size: Optional[str] = None  # the arch's size preset; unset: the arch's default. An arch without sizes refuses it.
    kwargs: dict[str, Any] = field(default_factory=dict)
    allow_random_init: bool = False  # build random pretrained towers (tests/demo) instead of failing

    def arch_kwargs(self) -> dict[str, Any]:
        """What the arch is built with: ``size`` (when set) and ``kwargs``."""
        return ({"size": self.size} if self.size is not None else {}) | self.kwargs


@dataclass
class RunConfig:
    """What every config-driven run has (training stages, jobs, prune): where it writes, its seed."""

    out_dir: str = "runs/unnamed"
    seed: int = 0

    def __post_init__(self) -> None:
        if not _LOADING.get():  # `load` checks once, after its last override
            self.check()

    def check(self) -> None:
        """Checks across several keys, run whenever a config is made (in code, or by `load`); raise
        ``UserError``."""


@dataclass
class StageConfig(RunConfig):
    """Fields every training stage has. Stage configs subclass this and add their own sections."""

    resume: str = "auto"  # auto | none | path to a checkpoint directory
    # Resume even though the config changes keys that define the run (engine.run_config): the
    # changes and the step they took effect at go to out_dir/config_history.json.
    resume_allow_changes: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def built_arch(self) -> str:
        """The registered arch that ``model.size``/``model.kwargs`` go to."""
        return self.model.arch

    def check(self) -> None:
        if self.train.schedule == "step" and self.train.decay_every <= 0:
            raise UserError("train.schedule: step needs train.decay_every > 0 (steps between lr decays)")
        if self.model.arch:
            from weatherkd.models import registry

            registry.check_kwargs(self.built_arch(), self.model.arch_kwargs())


# ---------------------------------------------------------------------------
# Building a dataclass from plain data, with strict checking.
# ---------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str, source: str):
    """Check ``value`` against annotation ``tp``; return it converted (dataclasses built)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{source}: '{key}' = {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/off/yes/on as a bool: `mixed_precision=no`
            value = next((a for a in (("no", "off", "false") if not value else ("yes", "on", "true")) if a in args),
                         value)
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: '{key}' = {value!r} must be one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return build(tp, value, source, prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        (item,) = args or (Any,)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' = {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' = {value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' = {value!r} must be a string")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")


def build(cls, data: dict, source: str = "<dict>", prefix: str = ""):
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", source)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------
# YAML + overrides.
# ---------------------------------------------------------------------------


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` (tags such as ``!!python/object`` are refused, never run), with a
    syntax error reported as one line: the source, line and column, and what is wrong."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: invalid YAML: {what}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like dotted.key=value")
    key, raw = text.split("=", 1)
    value = parse_yaml(raw, f"override '{text}'") if raw != "" else ""
    return key.strip().split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is not a section")
    node[path[-1]] = value


# Set while `load` builds a config: the state between two overrides may be one no run would
# have (schedule=step before decay_every=...), so its cross-key checks wait for the last one.
_LOADING = contextvars.ContextVar("weatherkd_config_loading", default=False)


def load(cls, path: str | os.PathLike | None = None, overrides: list[str] = ()):  # noqa: B006
    """Load ``cls`` from a YAML file and command-line overrides; errors name key and origin."""
    token = _LOADING.set(True)
    try:
        cfg = _load_unchecked(cls, path, overrides)
    finally:
        _LOADING.reset(token)
    if hasattr(cfg, "check"):
        try:
            cfg.check()
        except UserError as e:
            where = f"{path if path is not None else '<defaults>'}{' + overrides' if overrides else ''}"
            raise ConfigError(f"{where}: {e}") from None
    return cfg


def build_unchecked(cls, data: dict, source: str = "<dict>"):
    """``build`` without the cross-key checks: for reading back a config a run saved."""
    token = _LOADING.set(True)
    try:
        return build(cls, data, source)
    finally:
        _LOADING.reset(token)


def _load_unchecked(cls, path, overrides):
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        data = parse_yaml(text, str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        source = str(path)
    cfg = build(cls, data, source)
    # Overrides are checked one by one so the error names the command-line item.
    for item in overrides:
        keys, value = parse_override(item)
        merged = to_dict(cfg)
        apply_override(merged, keys, value)
        cfg = build(cls, merged, f"override '{item}'")
    return cfg


def save(cfg, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp + rename)."""
    from weatherkd.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
