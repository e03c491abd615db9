"""Models by name. Every exported model is ``model.safetensors`` + ``model.json`` ({"arch", "kwargs", ...}).

The model code knows nothing about launching: no accelerator, no ranks, no files
other than its own weights.
"""

from weatherkd.models.registry import ARCHS, build, check_restores_images, load, read_spec, register, save, verify  # noqa: F401
from weatherkd.models import baselines, clipweather, prompt_adapter, pruned, students, vq  # noqa: F401  (register their archs)
