"""What the command line turns into an exit code without a traceback: ``UserError`` (the user's
input is wrong: one line, exit 1) and ``Preempted`` (a run stopped on purpose, exit 75)."""


class UserError(Exception):
    """Bad input (config, paths, data). The message must name what is wrong and where."""


# The process exits with this after a preemption checkpoint: EX_TEMPFAIL, "try again later".
# Run directly, a scheduler can requeue on it. torchrun turns it into 1, so the SLURM templates
# instead treat a stop file this run consumed (deleted after its checkpoint) as the signal.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """A run that checkpointed and stopped because it was asked to (a signal or a stop file)."""

    exit_code = EXIT_PREEMPTED
