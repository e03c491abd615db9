"""What users run that is neither a training recipe nor a generation job: evaluation, reports,
restoring and exporting, pruning, benchmarks, memory planning and the demo. Each module here
parses its own flags (``run_cli``) or takes a config (prune), and uses the library below it."""
