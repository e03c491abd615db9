"""Sharded generation jobs that write distillation tars (synth, dream, cache-teacher), all run by one
runner (`jobs.runner`): sliced by rank or SLURM array task, atomic shards, resumed by skipping
finished shards."""
