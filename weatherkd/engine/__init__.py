"""The one training engine: each training stage (teacher, vq, distill, adapter) supplies a Recipe
and calls Engine(cfg, MyRecipe, "name").fit(). Generation jobs use ``weatherkd.jobs.runner`` instead."""

from weatherkd.engine.loop import Engine, build_accelerator  # noqa: F401
from weatherkd.engine.preempt import EXIT_PREEMPTED, Preempted  # noqa: F401
from weatherkd.engine.recipe import Recipe  # noqa: F401
