"""The registry of everything ``weatherkd`` runs: one entry per stage or command.

Three kinds:
- ``train``: a training stage on the engine (``Engine(cfg, RECIPE, name).fit()``), config-driven;
- ``job``: a sharded generation job writing distillation tars, config-driven;
- ``command``: a plain function; ``prune`` is config-driven, the others parse their own flags.

``cli.py``, ``commands.bench``, ``commands.demo`` and the tests read this table. The modules
live by kind: ``recipes/`` (train), ``jobs/`` (job), ``commands/`` (command; ``shards`` is ``data.cli``). Modules are imported only
when a stage is used, so ``weatherkd --help`` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

Kind = Literal["train", "job", "command"]


@dataclass(frozen=True)
class Stage:
    name: str
    kind: Kind
    module: str
    help: str
    configured: bool  # `weatherkd NAME --config FILE [key=value ...]`, with a `Config` class in its module

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def config_class(self) -> type:
        if not self.configured:
            raise TypeError(f"weatherkd {self.name} takes flags, not a config file")
        return self.load().Config


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("shards", "command", "weatherkd.data.cli",
          "build, ingest, inspect and check WebDataset shard sets", False),
    Stage("teacher", "train", "weatherkd.recipes.teacher",
          "train the CLIP-guided weather-removal teacher (DeepSpeed ZeRO)", True),
    Stage("distill", "train", "weatherkd.recipes.distill",
          "distil a student from an exported teacher (KD / DCKD, DDP)", True),
    Stage("vq", "train", "weatherkd.recipes.vq", "train the VQ autoencoder used by DCKD", True),
    Stage("adapter", "train", "weatherkd.recipes.adapter", "train the D4IR degradation-prompt adapter", True),
    Stage("synth", "job", "weatherkd.jobs.synth",
          "synthesise distillation tars with degradation-prompted Stable Diffusion", True),
    Stage("dream", "job", "weatherkd.jobs.dream", "synthesise distillation tars by inverting the teacher", True),
    Stage("cache-teacher", "job", "weatherkd.jobs.teacher_cache",
          "cache the teacher's full-resolution outputs in a copy of a paired shard set, for kd/dckd", True),
    Stage("prune", "command", "weatherkd.commands.prune",
          "adaptively prune a trained network into a student initialisation", True),
    Stage("eval", "command", "weatherkd.commands.evaluate",
          "evaluate an exported model on a shard set (accelerate launch splits it)", False),
    Stage("restore", "command", "weatherkd.commands.restore",
          "restore your own photos (files, folders, globs; any size) with a model folder or an exported file", False),
    Stage("export", "command", "weatherkd.commands.export",
          "export a model to ONNX, checked against PyTorch on real photos", False),
    Stage("bench", "command", "weatherkd.commands.bench", "benchmarks, printed as JSON", False),
    Stage("plan", "command", "weatherkd.commands.plan",
          "memory per GPU of a training stage (DDP, ZeRO-1/2/3) and the largest micro-batch that fits", False),
    Stage("report", "command", "weatherkd.commands.report",
          "gather several runs into one comparison table (markdown + JSON) and a page of figures (HTML)", False),
    Stage("demo", "command", "weatherkd.commands.demo",
          "the whole pipeline on the embedded default data; rerun to resume", False),
]}


# What `weatherkd bench` runs (argparse choices), listed here so the command line needs no torch import.
BENCH_NAMES = ["loader", "kd-overhead", "model", "step", "synth", "export"]


def get(name: str) -> Stage:
    return STAGES[name]


def of_kind(*kinds: Kind) -> list[str]:
    return [s.name for s in STAGES.values() if s.kind in kinds]


def configured() -> list[str]:
    return [s.name for s in STAGES.values() if s.configured]
