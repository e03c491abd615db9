"""`weatherkd demo`: the whole pipeline on the embedded photos (`pipeline`: its steps as data,
sized by a preset; `runner`: runs them and writes the report)."""

from weatherkd.commands.demo.pipeline import (DEFAULT, EVIDENCE, PRESETS, QUICK, STUDENTS, Preset, Step,
                                              check_shard_set, pipeline)
from weatherkd.commands.demo.runner import failure_lines, run, run_cli

__all__ = ["DEFAULT", "EVIDENCE", "PRESETS", "QUICK", "STUDENTS", "Preset", "Step", "check_shard_set", "failure_lines",
           "pipeline", "run", "run_cli"]
