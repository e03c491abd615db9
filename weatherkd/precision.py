"""The one place that decides how a training run holds its numbers: which dtype and device each
model gets, when autocast applies, what the EMA averages in, and what the export writes. The
engine places, averages and exports by it; `weatherkd plan` counts bytes by it.

- The trained model computes in the compute dtype (``train.mixed_precision``): under torch's
  autocast with fp32 weights under DDP; under DeepSpeed, cast to 16 bits by DeepSpeed itself, with
  its fp32 masters sharded in the optimizer. Either way the export is fp32, never a rounded copy.
- A recipe's helpers (``Helper``) are never trained. Each has one role: ``frozen`` (runs in the
  compute dtype), ``averaged`` (averages the trained weights into itself, so it stays fp32), or
  ``bundled`` (runs in the compute dtype; the export bundles it as loaded).
- The EMA averages in fp32, whatever the trained module holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from weatherkd.errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator

# Precision names as configs and flags spell them ("no" is accelerate's mixed_precision for fp32).
DTYPES = {"fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_named(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on a GPU, fp32 on the CPU (where half precision is slower, not faster)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def cpu_runs_fp16() -> bool:
    """Whether this CPU has the fp16 kernels DeepSpeed's CPU accelerator requires for fp16."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def refuse_unrunnable(mixed_precision: str | None, deepspeed: bool, no_gpu: bool) -> None:
    """One line, before any rank builds anything, for a precision this launch cannot run."""
    if mixed_precision != "fp16" or not no_gpu:
        return
    if not deepspeed:
        # accelerate gives fp16 on the CPU neither autocast nor loss scaling: the trained model
        # would stay fp32 while the frozen helpers, cast to the compute dtype, were fp16.
        raise UserError("train.mixed_precision: fp16 needs a GPU or a DeepSpeed launch (accelerate has no fp16 "
                        "on the CPU); use bf16 or no")
    if not cpu_runs_fp16():
        # DeepSpeed's CPU accelerator refuses fp16 there, with a traceback from inside its engine
        raise UserError("train.mixed_precision: fp16 under DeepSpeed on a CPU needs oneDNN's fp16 kernels "
                        "(AVX512-FP16 or AMX-FP16), which this CPU lacks; use bf16 or no")


def autocast(acc: "Accelerator"):
    """Mixed precision for forward passes: ``acc.autocast()``, except under DeepSpeed. There
    accelerate leaves autocast off, because DeepSpeed casts the model itself to 16 bits, so fp32
    batches (and frozen helpers' inputs) would meet 16-bit weights and the first convolution would
    refuse them; torch's autocast casts at each op instead, as it does under DDP."""
    dtype = DTYPES.get(acc.mixed_precision)
    if acc.state.deepspeed_plugin is not None and dtype not in (None, torch.float32):
        return torch.autocast(acc.device.type, dtype=dtype)
    return acc.autocast()


Role = Literal["frozen", "averaged", "bundled"]


@dataclass(eq=False)
class Helper:
    """A model a recipe runs beside the trained one, never trained, and what it is there for:

    - ``frozen``: runs in the compute dtype (a teacher, a VQ encoder, VGG features);
    - ``averaged``: averages the trained model's weights into itself (a history model). It stays
      fp32 whatever the compute dtype: a bf16 average would round each update, its checkpoint
      would depend on the precision, and torch's in-place lerp refuses an fp32 model averaged into
      a bf16 copy. Under autocast its forward still runs in the compute dtype;
    - ``bundled``: runs in the compute dtype, and the export bundles it with the model (a CLIP
      tower): ``export_state`` gives its weights as loaded, not the rounded copy it ran as.
    """

    module: nn.Module
    role: Role = "frozen"
    # Its weights as loaded (main process, CPU), kept by ``Precision.place`` where it rounds them.
    loaded: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def export_state(self) -> dict[str, torch.Tensor]:
        return self.loaded if self.loaded is not None else self.module.state_dict()


def is_float(module: nn.Module) -> bool:
    return any(p.is_floating_point() for p in module.parameters())


@dataclass(frozen=True)
class Precision:
    """How one run holds its models. Built from ``train.mixed_precision`` and
    ``train.channels_last`` and the launch (``of``); `weatherkd plan` builds one from the config
    alone."""

    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    channels_last: bool = False
    deepspeed: bool = False  # DeepSpeed casts the trained module itself to the compute dtype
    device: torch.device = torch.device("cpu")

    @classmethod
    def of(cls, train, acc: "Accelerator") -> "Precision":
        """``train``: a stage's ``TrainConfig``."""
        return cls(train.mixed_precision, train.channels_last, acc.state.deepspeed_plugin is not None, acc.device)

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.mixed_precision]

    @property
    def sixteen_bit(self) -> bool:
        return self.compute_dtype != torch.float32

    @property
    def loss_scaled(self) -> bool:
        """fp16 trains with a loss scaler (GradScaler, or DeepSpeed's), which skips overflowing
        gradients itself."""
        return self.mixed_precision == "fp16"

    def dtype_of(self, role: Role) -> torch.dtype:
        """The dtype a helper of ``role`` holds its weights in (the EMA is ``averaged`` too)."""
        return torch.float32 if role == "averaged" else self.compute_dtype

    # ------------------------------------------------------------------ helpers

    def place(self, helper: Helper, main_process: bool = True) -> None:
        """Freeze ``helper`` and move it to the device in its role's dtype, in eval mode. A bundled
        one that this rounds keeps its weights as loaded first (main process: it alone exports)."""
        module = helper.module.requires_grad_(False)
        dtype = self.dtype_of(helper.role) if is_float(module) else None
        if helper.role == "bundled" and dtype not in (None, torch.float32) and main_process:
            helper.loaded = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        module.to(self.device, dtype=dtype).eval()
        if self.channels_last:  # the batches arrive channels_last: so must every conv's weights
            module.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ the trained model

    def prepare_trained(self, model: nn.Module, ema_decay: float) -> tuple[nn.Module, "AveragedModel | None"]:
        """The trained model in its memory format and its EMA (``ema_decay`` > 0), before
        ``accelerator.prepare``."""
        # Under DeepSpeed the trained weights stay row-major: its first broadcast views each as
        # bytes, which needs a unit last stride. The batches are still channels_last, and so each
        # convolution is (its weight converted per call; the gradients come back row-major).
        if self.channels_last and not self.deepspeed:
            model = model.to(memory_format=torch.channels_last)
        ema = None
        if ema_decay > 0:  # taken before the cast below: its batch-norm statistics stay fp32
            ema = ema_of(model, ema_decay)
            ema.to(self.device).eval()
        if self.deepspeed and self.sixteen_bit:
            # DeepSpeed casts parameters to 16 bits and leaves buffers fp32; batch norm refuses
            # running statistics in another dtype than its weights.
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                    m.running_mean.data, m.running_var.data = (m.running_mean.to(self.compute_dtype),
                                                               m.running_var.to(self.compute_dtype))
        return model, ema

    # ------------------------------------------------------------------ the export

    def export_state(self, acc: "Accelerator", model: nn.Module, ema: AveragedModel | None
                     ) -> dict[str, torch.Tensor] | None:
        """The trained weights the export writes, fp32, on the main process (None elsewhere):
        the EMA's when there is one, else the model's, DeepSpeed's fp32 masters in place of its
        16-bit copy. Every rank calls it: consolidating ZeRO shards is a collective."""
        state = acc.get_state_dict(model) if ema is None else ema.module.state_dict()
        if ema is None and self.deepspeed and self.sixteen_bit:
            masters = self._fp32_masters(acc, model)
            if acc.is_main_process:
                state.update(masters)
        if not acc.is_main_process:
            return None
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def _fp32_masters(self, acc: "Accelerator", model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained weights as DeepSpeed's optimizer holds them, in fp32 (sharded: every rank
        takes part). In 16-bit training its module holds only a rounded copy of each."""
        from deepspeed.utils import safe_get_full_fp32_param

        from weatherkd.logs import get_logger

        full, rounded = {}, []
        for name, p in acc.unwrap_model(model).named_parameters():
            master = safe_get_full_fp32_param(p) if p.requires_grad else None
            if master is None:
                rounded.append(name)
            elif acc.is_main_process:
                full[name] = master.detach().cpu()
        if rounded and acc.is_main_process:  # frozen inside the trained model, or no fp32 masters
            get_logger(__name__).warning(
                "exported in %s, DeepSpeed holding no fp32 copy: %s", self.compute_dtype,
                ", ".join(rounded[:5]) + (f" and {len(rounded) - 5} more" if len(rounded) > 5 else ""))
        return full


def ema_of(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and buffers (torch's AveragedModel),
    kept in the precision it starts in. Under DeepSpeed the trained module itself holds 16-bit
    weights (the fp32 master copy is sharded in its optimizer): each update casts them to the
    average's precision, which torch's in-place lerp will not do."""
    return _EMA(model, decay)


class _EMA(AveragedModel):
    """AveragedModel's EMA over weights that may be 16-bit against fp32 averages. Its grouped
    (foreach) update pairs bf16 weights with fp32 averages but refuses fp16 ones (DeepSpeed's fp16
    module): with fp16 weights it updates tensor by tensor."""

    def __init__(self, model: nn.Module, decay: float):
        lerp = get_ema_multi_avg_fn(decay)

        def grouped(averaged, current, num_averaged):
            lerp(averaged, [c.to(a.dtype) for a, c in zip(averaged, current)], num_averaged)

        def one(averaged, current, num_averaged):
            if not averaged.is_floating_point():  # as the grouped update treats integer buffers
                return averaged * decay + current * (1 - decay)
            return averaged.lerp(current.to(averaged.dtype), 1 - decay)

        super().__init__(model, multi_avg_fn=grouped, use_buffers=True)
        self.grouped, self.avg_fn = grouped, one

    def update_parameters(self, model: nn.Module) -> None:
        fp16 = any(p.dtype == torch.float16 for p in model.parameters())
        self.multi_avg_fn = None if fp16 else self.grouped  # AveragedModel takes avg_fn when this is None
        super().update_parameters(model)
