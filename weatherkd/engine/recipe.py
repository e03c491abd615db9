"""What a stage hands the engine: its model, its frozen helpers, and one step of its objective."""

from __future__ import annotations

import torch
from torch import nn

from weatherkd.precision import Helper


class Recipe:
    """Subclass per stage. The engine owns everything else: devices, precision, the loop,
    checkpoints, validation, tracking and export.

    - ``model``: the network being trained (built with ``weatherkd.models.build``).
    - ``helpers``: the models it runs beside it and never trains (teacher, CLIP towers, history
      model, VQ encoder), each with its role (``precision.Helper``: frozen, averaged into, or
      bundled with the export). The engine places them by ``precision.Precision`` (device, dtype,
      frozen, eval mode) and leaves them out of ``accelerator.prepare``.
    - ``frozen``: the helpers' modules by name, for the recipe's steps.
    - ``random_init``: True when a pretrained tower was replaced by random weights; every
      result this run writes says so.
    """

    model: nn.Module
    helpers: dict[str, Helper]
    random_init: bool = False
    # The ``record_function`` labels the recipe's step puts on its parts (`bench kd-overhead`).
    profile_labels: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, helpers: dict[str, Helper] | None = None):
        self.model = model
        self.helpers = helpers or {}

    @property
    def frozen(self) -> dict[str, nn.Module]:
        return {name: h.module for name, h in self.helpers.items()}

    def bundled_state(self, name: str) -> dict[str, torch.Tensor]:
        """A bundled helper's weights for the export: as loaded, not the compute-dtype copy."""
        return self.helpers[name].export_state()

    def step(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Named losses for one micro-batch; ``"loss"`` is the total that is backpropagated."""
        raise NotImplementedError

    def predict(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The restored image for validation, (B, 3, H, W) in [0, 1]."""
        return model(batch["input"])

    def validate(self, model: nn.Module, loader, accelerator, to_device) -> dict | None:
        """A stage whose model does not restore images scores itself here (every rank takes part)
        and returns its metrics. None, the default: the engine's PSNR/SSIM validation of ``predict``.
        Its forward passes go under ``precision.autocast(accelerator)``, as the steps do (frozen helpers are
        in the compute dtype); its scores outside it, where bf16 would round near-ties together."""
        return None

    def after_step(self, step: int, model: nn.Module, ema_model: nn.Module | None) -> None:
        """Called after each optimizer step (e.g. to update a history model). ``model``'s weights
        are whole only at steps where `reads_weights_after` says they are read: under ZeRO-3 they
        are partitioned (empty on each rank) otherwise."""

    def reads_weights_after(self, step: int) -> bool:
        """Whether ``after_step`` at ``step`` reads the trained model's weights: the engine then
        gathers them where they are sharded (ZeRO-3), and only then."""
        return False

    def state_dict(self) -> dict:
        """Extra state a resume needs (history model, its schedule position, ...)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def export_model(self, model: nn.Module, state: dict) -> tuple[nn.Module, dict]:
        """What to export: by default the trained model itself. A stage may bundle frozen parts
        the model needs at inference (e.g. the teacher's CLIP image tower)."""
        return model, state

    def export_extra(self) -> dict:
        """Extra fields for model.json."""
        return {}

    def after_export(self, engine, path) -> None:
        """Called on every rank once ``path`` (the exported model) is complete, e.g. to record
        something about the model as users load it next to its weights. ``engine`` gives the
        accelerator, config, data and device placement."""
