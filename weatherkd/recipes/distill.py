"""`weatherkd distill`: train a compact student from an exported teacher (DCKD, docs/references.md).

``objective``:
- ``scratch``: ground truth only (the baseline every KD result is compared with);
- ``kd``: the teacher's output, plus ground truth when the shards have it.
Both measure their terms by the distance ``pixel`` (L1 by default).
- ``dckd``: kd plus dynamic contrastive regularisation against negatives passed through the
  history model, plus distribution matching on the VQ codebook.

``consistency`` adds, to the objectives it lists (kd, dckd), the official DCKD recipe's fifth
term (``cri_lcr``): L1 from the student's output to the teacher's output on a randomly inverted,
flipped and transposed copy of the input, transformed back.

The history model is an EMA of the student's EMA (``train.ema_decay``), updated every ``s``
steps with ``s`` growing at milestones. Teacher, history and VQ run under no_grad; the
student's output alone carries gradients (through the frozen VQ encoder).
Shards without targets work: the cached ``teacher.png`` is the target when present,
otherwise the teacher runs online.
"""

from __future__ import annotations

import bisect
import copy
import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.profiler import record_function

from weatherkd import models
from weatherkd.config import ModelConfig, StageConfig
from weatherkd.engine import Engine, Recipe
from weatherkd.errors import UserError
from weatherkd.logs import get_logger
from weatherkd.losses import distill as D
from weatherkd.losses.restoration import PIXEL
from weatherkd.models.fusion import frozen_copy
from weatherkd.precision import DTYPES, Helper, ema_of
from weatherkd.jobs.runner import check_taught_by

log = get_logger(__name__)


@dataclass
class HistoryConfig:
    decay: float = 0.1  # history = decay · history + (1 − decay) · EMA (the official code: 0.1)
    every: list[int] = field(default_factory=lambda: [1000, 2000, 3000])  # update interval s ...
    milestones: list[int] = field(default_factory=lambda: [100_000, 200_000])  # ... moving on at these steps


@dataclass
class DCKDConfig:
    w_contrast: float = 0.1
    w_dmm: float = 0.001
    level_weights: list[float] = field(default_factory=lambda: [1 / 8, 1 / 4, 1 / 2, 1.0])  # one per VQ level
    negatives: list[str] = field(default_factory=lambda: ["blur", "resize", "noise", "weather"])
    eps: float = 1e-7
    # The history model and the frozen VQ over the negatives: in the training precision ("train"),
    # or in bf16 whatever the student trains in. The student is pushed far from the negatives, so
    # bf16's rounding of them is small against the distance; where bf16 is fast it halves the
    # frozen VQ's cost (`weatherkd bench kd-overhead` measures both).
    frozen_precision: Literal["train", "bf16"] = "train"
    # Both terms through torch.compile (losses.distill.compiled): eager, the contrastive term's
    # forward is the largest part DCKD adds to a CPU step, and memory-bound. The same values and
    # gradient in fp32 (under bf16 autocast they differ by bf16's rounding: inductor keeps fp32
    # intermediates). Needs a C/C++ compiler and Python's headers (a probe build checks before
    # the run starts); each process's first step compiles.
    compile: bool = False

    @property
    def copy_dtype(self) -> torch.dtype | None:
        """The dtype of the history model's and VQ's copies that run the negatives; None: no copies."""
        return None if self.frozen_precision == "train" else DTYPES[self.frozen_precision]


@dataclass
class ConsistencyConfig:
    """The official DCKD recipe's ``cri_lcr`` term (its dckd_model.py; values from
    options/train/SwinIR/train_SwinIR_SRx4_DCKD.yml): the teacher restores a copy of the input in
    which each sample is colour-inverted, flipped both ways and transposed, each with probability
    ``prob``; its output, transformed back, is one more L1 target for the student's output on the
    original input. A test-time-augmentation-like target, so gains credited to DCKD may partly be
    this term's (DCKD's official code, super-SSS/DCKD).

    A section of its own rather than ``dckd.consistency``: it needs only a teacher, so it applies
    to kd as well, and one config is run with every objective (``objective=`` overrides,
    slurm/submit-pipeline.sh). ``objectives`` says which of them use it, so that a config can give
    its dckd runs the official recipe while its kd runs stay plain kd."""

    objectives: list[Literal["kd", "dckd"]] = field(default_factory=list)  # [] = off; e.g. [dckd] or [kd, dckd]
    prob: float = 0.5  # per sample and transform (official: train.noisy.prob 0.5)
    weight: float = 1.0  # official: lcr_opt, L1, loss_weight 1.0
    # Which transforms may be drawn (official: all four). Inverted or transposed weather is not
    # weather the teacher has seen (dark streaks, horizontal rain), so its outputs there may be
    # poor targets; the flips alone keep it in its domain.
    ops: list[Literal["invert", "flip_rows", "flip_columns", "transpose"]] = field(default_factory=lambda: list(D.CONSISTENCY_OPS))


@dataclass
class Config(StageConfig):
    out_dir: str = "runs/distill"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="unet_bn"))
    teacher: str = ""  # exported teacher directory (model.json + model.safetensors)
    init: str = ""  # start the student from this exported model (e.g. `weatherkd prune`'s); replaces model.arch
    vq: str = ""  # exported VQ autoencoder directory (dckd)
    objective: Literal["scratch", "kd", "dckd"] = "kd"
    w_kd: float = 1.0
    w_gt: float = 1.0  # to ground truth when the shards have targets
    # The distance of the kd and gt terms to their targets. L1's best answer on a pixel the model
    # cannot place is the median of what it has seen there, and where a weather leaves most pixels
    # exact that is the input itself: a scratch student on raindrop alone stays exactly the identity
    # with l1 and removes some drops with l2, whose answer is the mean; trained on all weathers, l2
    # trades clean-in and held-out safety for test PSNR (docs/results/2026-12-07-student-pixel-loss.md).
    # smooth_l1 (Huber, β 1) is half of l2 on errors below 1, i.e. almost everywhere here.
    # The consistency term stays L1, as officially.
    pixel: Literal["l1", "l2", "smooth_l1"] = "l1"
    dckd: DCKDConfig = field(default_factory=DCKDConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)

    @property
    def uses_consistency(self) -> bool:
        return self.objective in self.consistency.objectives

    def check(self) -> None:
        super().check()
        c = self.consistency
        if not 0.0 <= c.prob <= 1.0:
            raise UserError(f"consistency.prob = {c.prob} must be between 0 and 1")
        if c.objectives and not c.ops:
            raise UserError(f"consistency.ops is empty: list some of {', '.join(D.CONSISTENCY_OPS)}, "
                            "or turn the term off with consistency.objectives=[]")
        if c.objectives and c.weight <= 0:
            raise UserError(f"consistency.weight = {c.weight} must be > 0 where consistency.objectives lists "
                            f"{', '.join(c.objectives)} (an empty list turns the term off)")


def loads_teacher(cfg: Config, cached: bool) -> bool:
    """Whether a run holds the teacher: every kd/dckd run whose set does not cache its outputs,
    and one that does when it uses consistency (its transformed inputs are not in the cache).
    `weatherkd plan` counts the teacher by the same rule."""
    return cfg.objective != "scratch" and (not cached or cfg.uses_consistency)


def _probe(x: torch.Tensor) -> torch.Tensor:
    return x + 1


@functools.cache
def compiler_missing() -> str | None:
    """Why torch.compile cannot build here, or None, asked before the first step needs it: a
    one-op function compiled once per process, on the GPU where there is one (triton's kernels,
    built by the C compiler) and on the CPU otherwise (inductor's C++, which needs Python's
    headers too). A machine may have a compiler and still not build, so this builds rather than
    looks."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.compile(_probe, fullgraph=True)(torch.zeros(2, device=device))
    except Exception as e:  # whatever the toolchain lacks, the user gets one line, not inductor's trace
        log.debug("torch.compile probe on %s failed", device, exc_info=True)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"  # the compiler's last word
        return f"dckd.compile: torch.compile cannot build on this machine's {device} ({why}); install a " \
               "C/C++ compiler (g++, or $CXX) and Python's headers, or set dckd.compile=false"
    return None


def _load(path: str, key: str):
    if not path:
        raise UserError(f"{key} is not set: give an exported model directory")
    return models.load(path)


def init_student(path: str) -> torch.nn.Module:
    """An exported model as the student's starting point. Parameters its forward never reaches
    (e.g. a teacher's weather-text head) are frozen, so DDP does not wait for their gradients."""
    student = _load(path, "init")
    probe = copy.deepcopy(student).train()  # a copy: a forward may leave tensors on modules
    probe(torch.rand(2, 3, 32, 32)).float().mean().backward()
    reached = {n for n, p in probe.named_parameters() if p.grad is not None}
    for n, p in student.named_parameters():
        p.requires_grad_(p.requires_grad and n in reached)
    return student


class DistillRecipe(Recipe):
    profile_labels = ("distill/student_forward", "distill/teacher", "distill/consistency_teacher",
                      "distill/dckd_negatives", "distill/dckd_history", "distill/dckd_vq_frozen",
                      "distill/dckd_vq_student", "distill/dckd_contrast", "distill/dckd_dmm",
                      "distill/history_update")

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.pixel = PIXEL[cfg.pixel]
        student = init_student(cfg.init) if cfg.init else \
            models.build(cfg.model.arch, **cfg.model.arch_kwargs())
        helpers = {}
        # A set taught by this teacher (`weatherkd cache-teacher`, or dreamed/synthesised with it) carries its
        # outputs: the teacher is not even loaded. A set made by another teacher is refused.
        self.cached_teacher = False
        if cfg.objective != "scratch":
            if not cfg.teacher:
                raise UserError("teacher is not set: give an exported model directory")
            self.cached_teacher = check_taught_by(cfg.data.train_shards, cfg.teacher)
            if loads_teacher(cfg, self.cached_teacher):
                helpers["teacher"] = Helper(_load(cfg.teacher, "teacher"))
            self.random_init = bool(models.verify(cfg.teacher).get("random_init", False))
        if cfg.objective == "dckd":
            helpers["vq"] = Helper(_load(cfg.vq, "vq"))
            levels = len(helpers["vq"].module.features(torch.zeros(1, 3, 16, 16)))
            if len(cfg.dckd.level_weights) != levels:
                raise UserError(f"dckd.level_weights has {len(cfg.dckd.level_weights)} entries; the VQ has {levels} levels")
            helpers["history"] = Helper(ema_of(copy.deepcopy(student), cfg.history.decay), "averaged")
        super().__init__(student, helpers)
        self.history_updates = 0
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._bf16_copies: dict[str, torch.nn.Module] = {}
        self.contrastive, self.code_mapping = D.contrastive, D.code_mapping
        if cfg.objective == "dckd" and cfg.dckd.compile:
            if missing := compiler_missing():
                raise UserError(missing)
            self.contrastive, self.code_mapping = D.compiled(D.contrastive_formula), D.compiled(D.code_mapping)

    # -- the objective ---------------------------------------------------------

    @torch.no_grad()
    def teacher_output(self, batch: dict) -> torch.Tensor:
        if "teacher" in batch:  # cached in a distillation tar
            return batch["teacher"]
        if "teacher" not in self.frozen:
            raise UserError(f"{self.cfg.data.train_shards}: a sample has no teacher image although the set says it "
                            "holds the teacher's outputs")
        return self.frozen["teacher"](batch["input"]).clamp(0, 1)

    def step(self, model, batch, step):
        x, target, c = batch["input"], batch.get("target"), self.cfg
        with record_function("distill/student_forward"):  # labels: `weatherkd bench kd-overhead` times each part
            out = model(x)
        losses = {}
        if c.objective == "scratch":
            if target is None:
                raise UserError("objective: scratch needs shards with targets")
            losses["gt"] = self.pixel(out, target)
        else:
            with record_function("distill/teacher"):
                teacher = self.teacher_output(batch)
            losses["kd"] = c.w_kd * self.pixel(out, teacher)
            if target is not None and c.w_gt:
                losses["gt"] = c.w_gt * self.pixel(out, target)
            if c.uses_consistency:
                losses["consistency"] = self.consistency_term(x, out)
            if c.objective == "dckd":
                losses.update(self.dckd_terms(x, out, teacher))
        losses["loss"] = sum(losses.values())
        return losses

    def consistency_term(self, x, out) -> torch.Tensor:
        """``consistency.weight`` · L1(student(x), T⁻¹(teacher(T(x)))), T drawn per sample.

        The teacher runs online for this term even where the set caches its outputs (the kd and
        dckd terms still read the cache). The cache holds its output on the input as stored; on a
        transformed copy the teacher gives another image (it is not equivariant to inversion,
        flips and transposition; that difference is all this term adds), and caching all 16
        combinations would multiply the set by 16. So it runs as the online teacher does: under
        no_grad, in the frozen helpers' precision (the engine's autocast), clamped to [0, 1]. Its
        output is transformed back in fp32: 1 − y in bf16 would round dark pixels by up to 2⁻⁹."""
        c = self.cfg.consistency
        ops = D.consistency_ops(len(x), c.prob, self.generator, c.ops)
        with torch.no_grad(), record_function("distill/consistency_teacher"):
            target = D.untransform(self.frozen["teacher"](D.transform(x, ops)).float().clamp(0, 1), ops)
        return c.weight * F.l1_loss(out, target)

    def dckd_terms(self, x, out, teacher) -> dict:
        c, vq, history = self.cfg.dckd, self.frozen["vq"], self.frozen["history"]
        with torch.no_grad():
            with record_function("distill/dckd_negatives"):
                negatives = [x] + [D.degrade(x, kind, teacher, self.generator) for kind in c.negatives]
            if c.copy_dtype is not None:
                # bf16 copies, batch norm folded: one pass less per layer, and with the engine's
                # autocast off for them, no casts per call (under fp16 mixed precision it would
                # recast their weights). The features stay bf16; the contrastive term promotes them
                # as it subtracts.
                history_bf16, vq_bf16 = self.frozen_bf16("history", history.module), self.frozen_bf16("vq", vq)
                with record_function("distill/dckd_history"), torch.autocast(x.device.type, enabled=False):
                    restored = history_bf16(torch.cat(negatives).to(c.copy_dtype)).clamp(0, 1)
                with record_function("distill/dckd_vq_frozen"):
                    with torch.autocast(x.device.type, enabled=False):
                        neg_levels = vq_bf16.features(restored)
                    # The teacher's features, in the training precision: the student comes so
                    # close to them that bf16's rounding would be as large as the distance it pulls on.
                    teacher_feats = vq.features(teacher)
            else:
                with record_function("distill/dckd_history"):
                    restored = history(torch.cat(negatives)).clamp(0, 1)  # one batched forward for all negatives
                with record_function("distill/dckd_vq_frozen"):  # the negatives' and the teacher's, in one forward
                    both = vq.features(torch.cat([restored, teacher]))
                    neg_levels, teacher_feats = [f[:-len(x)] for f in both], [f[-len(x):] for f in both]
            per_level = [level.chunk(len(negatives)) for level in neg_levels]
            neg_feats = [[level[i] for level in per_level] for i in range(len(negatives))]
        with record_function("distill/dckd_vq_student"):
            student_feats = vq.features(out)
        with record_function("distill/dckd_contrast"):
            terms = {"contrast": c.w_contrast * self.contrastive(student_feats, teacher_feats, neg_feats,
                                                                 c.level_weights, c.eps)}
        if c.w_dmm:
            with record_function("distill/dckd_dmm"):
                terms["dmm"] = c.w_dmm * self.code_mapping(vq.code_logits, student_feats[-1], teacher_feats[-1])
        return terms

    def frozen_bf16(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """A bf16 copy of a frozen helper (``dckd.frozen_precision: bf16``), made once and again
        after each history update."""
        if name not in self._bf16_copies:
            channels_last = self.cfg.train.channels_last
            self._bf16_copies[name] = frozen_copy(module, self.cfg.dckd.copy_dtype, channels_last)
        return self._bf16_copies[name]

    # -- the history model -------------------------------------------------------

    def history_interval(self, step: int) -> int:
        h = self.cfg.history
        return h.every[min(bisect.bisect_right(h.milestones, step), len(h.every) - 1)]

    def reads_weights_after(self, step: int) -> bool:
        return "history" in self.frozen and step % self.history_interval(step) == 0

    def after_step(self, step, model, ema_model):
        if not self.reads_weights_after(step):
            return
        with torch.no_grad(), record_function("distill/history_update"):
            self.frozen["history"].update_parameters(ema_model if ema_model is not None else model)
            self._bf16_copies.pop("history", None)
            if self.cfg.dckd.copy_dtype is not None:  # remade here, so the update's label holds its cost
                self.frozen_bf16("history", self.frozen["history"].module)
        self.history_updates += 1

    def state_dict(self) -> dict:
        state = {"history_updates": self.history_updates, "generator": self.generator.get_state()}
        if "history" in self.frozen:
            state["history"] = self.frozen["history"].state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.history_updates = state["history_updates"]
        self.generator.set_state(state["generator"])
        if "history" in self.frozen:
            self.frozen["history"].load_state_dict(state["history"])
        self._bf16_copies.pop("history", None)

    def export_extra(self) -> dict:
        return {"objective": self.cfg.objective, "teacher": self.cfg.teacher or None, "init": self.cfg.init or None,
                "teacher_cached": self.cached_teacher, "consistency": self.cfg.uses_consistency}


RECIPE = DistillRecipe  # what `weatherkd bench step` builds for this stage


def run(cfg: Config) -> int:
    Engine(cfg, RECIPE, "distill").fit()
    return 0
