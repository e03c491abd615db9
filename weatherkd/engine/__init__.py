"""The one training engine: every stage supplies a Recipe and calls Engine(cfg, MyRecipe).fit()."""

from weatherkd.engine.loop import Engine, build_accelerator  # noqa: F401
from weatherkd.engine.preempt import EXIT_PREEMPTED  # noqa: F401
from weatherkd.engine.recipe import FeatureStatsConfig, Recipe  # noqa: F401
