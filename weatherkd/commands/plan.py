"""`weatherkd plan`: the memory one training stage needs per GPU, before a job is submitted.

- Model states (parameters, gradients, optimizer state) per GPU under DDP and ZeRO-1/2/3, Adam,
  no offload. In bf16/fp16, ZeRO-2/3 come from DeepSpeed's own estimators and ZeRO-1 uses their
  bytes per parameter (2 + 2 for 16-bit weights and grads, 16 for fp32 grads, weights and Adam
  moments, the 16 sharded). In fp32 DeepSpeed keeps no 16-bit copy (4 + 4 + 8, sharded by stage).
  DDP keeps fp32 weights, grads and moments plus its gradient buckets: 20, unsharded.
- The helpers a stage runs beside its model (teacher, CLIP towers, VQ, DCKD's history model) and
  the EMA, each in the dtype ``precision.Precision`` gives its role: the compute dtype, fp32 for
  what averages the trained weights; plus the copies DCKD makes in ``dckd.frozen_precision``.
- Activations: the bytes autograd saves for backward in one forward of the trained model and
  the loss terms that carry its gradient, at the config's crop, measured with
  ``torch.autograd.graph.saved_tensors_hooks`` (unique storages, parameters excluded) under
  autocast when the config trains in 16 bits. Measured at batch 1 and 2: the difference is the
  per-sample cost, the rest (e.g. autocast's 16-bit weight copies) a fixed cost. This runs on CPU
  and GPU alike.
- The largest micro-batch that fits ``--gpu-mem`` GB after model states, frozen models and a
  fixed reserve for the CUDA context and allocator fragmentation.

Models are built at their real size with random weights, offline: nothing is read but the config
(and, for a student with ``init``, the exported model it starts from; for distillation, the
exported teacher and VQ where they exist, and whether the training set caches the teacher's
outputs, as the run decides whether to load the teacher).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weatherkd import config as cfgmod
from weatherkd import cost, models, stages
from weatherkd.errors import UserError
from weatherkd.precision import Precision, Role

GB = 1024**3
RESERVE_GB = 2.0  # CUDA context, NCCL buffers, allocator fragmentation
STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
PLANNED = ("teacher", "distill", "vq")


@dataclass(frozen=True)
class Counted:
    """A model held beside the trained one: its parameters, and its role (``precision.Helper``)
    or, for a copy a recipe makes itself, its own dtype."""

    params: int
    role: Role = "frozen"
    dtype: torch.dtype | None = None

    def bytes(self, precision: Precision) -> int:
        return self.params * (self.dtype or precision.dtype_of(self.role)).itemsize


@dataclass
class Planned:
    """What one training stage holds on a GPU: the model it trains, how a batch goes through it,
    and the models it runs beside it (name -> parameters and role)."""

    trained: torch.nn.Module
    forward: object  # (images) -> output; the trained model's parameters take gradients
    held: dict[str, Counted] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    copies: dict[str, Counted] = field(default_factory=dict)  # made beside the held ones (dckd.frozen_precision)

    def of_role(self, *roles: Role) -> dict[str, int]:
        return {k: c.params for k, c in self.held.items() if c.role in roles}

    def bytes(self, precision: Precision) -> int:
        return sum(c.bytes(precision) for c in itertools.chain(self.held.values(), self.copies.values()))


def _clip_tower(name: str) -> torch.nn.Module:
    from weatherkd.models.clip import build_random

    return build_random(name)


def planned_models(stage: str, cfg) -> Planned:
    """The real-size models a training stage's config builds, with random weights."""
    if stage == "teacher":
        from weatherkd.models import clip

        m = cfg.model
        if m.arch != "clipweather":
            return Planned(models.build(m.arch, **m.arch_kwargs()), None)
        tower = _clip_tower(m.clip.image.name)
        prior = clip.ImagePrior(tower).eval()
        text_dim = int(tower.text_projection.shape[1]) if hasattr(tower, "text_projection") else 512
        net = models.build("clipweather_net", prior_dim=prior.width, text_dim=text_dim, **m.arch_kwargs())
        # roles as TeacherRecipe declares them
        held = {f"clip image tower ({m.clip.image.name})": Counted(cost.params(prior), "bundled")}
        if cfg.loss.w_srd > 0:
            held[f"clip residual tower ({m.clip.residual.name})"] = Counted(cost.params(
                _clip_tower(m.clip.residual.name).visual))
        vgg = None
        if cfg.loss.w_perceptual > 0:
            import torchvision

            vgg = torchvision.models.vgg16().features[:16].requires_grad_(False)
            held["vgg16 features[:16]"] = Counted(cost.params(vgg))

        def forward(x):
            with torch.no_grad():
                p = prior(x)
            out, aux = net(x, p, return_aux=True)  # as the teacher trains: SAR maps and prior for its losses
            return (out, aux, vgg(out)) if vgg is not None else (out, aux)  # the perceptual loss backprops through VGG

        return Planned(net, forward, held | _ema(cfg, net))
    if stage == "distill":
        if cfg.init:
            if not (Path(cfg.init) / "model.json").is_file():
                raise UserError(f"init: {cfg.init} is not an exported model yet; plan this stage once it exists "
                                f"(its shapes come from it)")
            student = models.load(cfg.init)
        else:
            student = models.build(cfg.model.arch, **cfg.model.arch_kwargs())
        from weatherkd.recipes.distill import loads_teacher
        from weatherkd.jobs.runner import check_taught_by

        held, notes, loaded = {}, [], {}
        # The teacher as the run holds it: not at all where the set caches its outputs, unless
        # consistency runs it online on transformed inputs. A set not written yet counts it.
        cached = (cfg.objective != "scratch" and (Path(cfg.teacher) / "model.json").is_file()
                  and check_taught_by(cfg.data.train_shards, cfg.teacher))
        if cached:
            notes.append(f"{cfg.data.train_shards} caches the teacher's outputs: " + (
                "the teacher is still held, for consistency (it runs online on transformed inputs)"
                if loads_teacher(cfg, cached) else "the teacher is not loaded, nor counted"))
        for key, needed in (("teacher", loads_teacher(cfg, cached)), ("vq", cfg.objective == "dckd")):
            path = getattr(cfg, key)
            if not needed:
                continue
            if (Path(path) / "model.json").is_file():
                loaded[key] = models.load(path).eval().requires_grad_(False)
                held[key] = Counted(cost.params(loaded[key]))
            else:
                notes.append(f"{key} {path or '(unset)'} is not exported yet: its weights, and the graph of "
                             f"the loss terms through it, are not counted")
        held |= _ema(cfg, student)
        copies = {}
        if cfg.objective == "dckd":  # roles and copies as DistillRecipe declares and makes them
            held["history model"] = Counted(cost.params(student), "averaged")
            if (copy := cfg.dckd.copy_dtype) is not None:  # the negatives' history model and VQ, as extra copies
                copies = {k: Counted(held[k].params, dtype=copy) for k in ("history model", "vq") if k in held}
        vq = loaded.get("vq")

        def forward(x):
            out = student(x)
            return (out, vq.features(out)) if vq is not None else out  # DCKD backprops through the VQ encoder

        return Planned(student, forward, held, notes, copies)
    if stage == "vq":
        net = models.build(cfg.model.arch, **cfg.model.arch_kwargs())
        return Planned(net, None, _ema(cfg, net))
    raise UserError(f"weatherkd plan covers the {', '.join(PLANNED)} stages, not '{stage}'")


def _ema(cfg, trained: torch.nn.Module) -> dict[str, Counted]:
    """The engine's EMA of the trained model (``train.ema_decay``): it averages, like a history model."""
    return {"EMA": Counted(cost.params(trained), "averaged")} if cfg.train.ema_decay > 0 else {}


def saved_activation_bytes(fn, params: set[int]) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn()`` runs, parameters excluded."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def activation_bytes(forward, params: set[int], sample_shape: tuple, autocast_dtype=None) -> tuple[int, int]:
    """(bytes per sample, fixed bytes) saved for backward by ``forward(images)``, measured at batch 1
    and 2; the fixed part is what does not grow with the batch (e.g. autocast's 16-bit weight copies)."""
    def saved_at(batch: int) -> int:
        x = torch.rand(batch, *sample_shape)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            return saved_activation_bytes(lambda: forward(x), params)

    one, two = saved_at(1), saved_at(2)
    return two - one, max(0, 2 * one - two)


def model_state_bytes(params: int, gpus: int, nodes: int, largest_layer: int, sixteen_bit: bool = True
                      ) -> dict[str, int]:
    """Per-GPU bytes of parameters, gradients and optimizer state (Adam), without offload."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs its accelerator choice to stdout on import
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total = gpus * nodes
    if not sixteen_bit:  # fp32: weights 4 + grads 4 + Adam moments 8, sharded stage by stage
        return {"ddp": 20 * params, "zero1": 8 * params + 8 * params // total,
                "zero2": 4 * params + 12 * params // total, "zero3": 4 * largest_layer + 16 * params // total}
    return {
        "ddp": 20 * params,
        "zero1": 4 * params + 16 * params // total,
        "zero2": estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=False)[1],
        "zero3": estimate_zero3_model_states_mem_needs(params, largest_layer, gpus, nodes, cpu_offload=False)[1],
    }


def read_launch(path: str | None) -> dict:
    """Processes, machines, and the strategy of an accelerate launch file."""
    if not path:
        return {"processes": 8, "machines": 1, "strategy": None, "offload": False, "file": None}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--launch: file not found: {p}")
    launch = cfgmod.parse_yaml(p.read_text(), str(p))
    if not isinstance(launch, dict):
        raise UserError(f"--launch: {p} is not an accelerate launch config (a YAML mapping)")
    counts = {}
    for key in ("num_processes", "num_machines"):
        value = launch.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"--launch: {p}: {key} must be a positive integer, got {value!r}")
        counts[key] = value
    strategy, offload = "ddp", False
    if launch.get("distributed_type") == "DEEPSPEED":
        ds = launch.get("deepspeed_config") or {}
        zero = {"stage": ds.get("zero_stage", 0)} if isinstance(ds, dict) else {}
        if isinstance(ds, dict) and ds.get("deepspeed_config_file"):
            ds_file = Path(ds["deepspeed_config_file"])  # accelerate reads it relative to the working directory
            try:
                zero = json.loads(ds_file.read_text()).get("zero_optimization", {})
            except (OSError, ValueError, AttributeError) as e:
                raise UserError(f"--launch: {p}: cannot read its deepspeed_config_file {ds_file} "
                                f"(relative to the working directory): {e}") from None
        stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
        offload = isinstance(zero, dict) and any(zero.get(k) for k in ("offload_optimizer", "offload_param"))
        strategy = f"zero{stage}" if stage else "ddp"
    return {"processes": counts["num_processes"], "machines": counts["num_machines"], "strategy": strategy,
            "offload": offload, "file": str(p)}


def plan(stage: str, cfg, launch: dict, gpu_mem_gb: float) -> dict:
    planned = planned_models(stage, cfg)
    net = planned.trained.train()
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    largest = max((p.numel() for p in net.parameters()), default=0)
    machines = launch["machines"]
    gpus_per_node = max(1, launch["processes"] // machines)
    precision = Precision(cfg.train.mixed_precision, cfg.train.channels_last)
    crop = cfg.data.crop
    forward = planned.forward or net
    param_ptrs = {p.untyped_storage().data_ptr() for p in net.parameters()}

    per_sample, fixed = activation_bytes(forward, param_ptrs, (3, crop, crop),
                                         precision.compute_dtype if precision.sixteen_bit else None)
    frozen_bytes = planned.bytes(precision)
    states = model_state_bytes(params, gpus_per_node, machines, largest, precision.sixteen_bit)
    notes = list(planned.notes)
    if launch.get("offload"):
        notes.append("the launch file offloads to CPU, which these figures do not model: GPU memory is lower")
    rows = {}
    for name in STRATEGIES:
        free = gpu_mem_gb * GB - states[name] - frozen_bytes - fixed - RESERVE_GB * GB
        rows[name] = {"model_states_gb": states[name] / GB, "max_micro_batch": max(0, int(free // per_sample))}
    batch = cfg.data.batch_size
    return {
        "stage": stage, "trained_params": params, "largest_tensor_params": largest,
        "frozen_params": planned.of_role("frozen", "bundled"), "fp32_params": planned.of_role("averaged"),
        "bf16_params": {k: c.params for k, c in planned.copies.items()}, "frozen_gb": frozen_bytes / GB,
        "activation_fixed_gb": fixed / GB,
        "activation_gb_per_sample": per_sample / GB, "crop": crop, "mixed_precision": cfg.train.mixed_precision,
        "micro_batch": batch, "activation_gb_at_micro_batch": batch * per_sample / GB,
        "gpus": gpus_per_node * machines, "gpus_per_node": gpus_per_node, "nodes": machines,
        "gpu_mem_gb": gpu_mem_gb, "reserve_gb": RESERVE_GB, "launch": launch["file"],
        "launch_strategy": launch["strategy"], "strategies": rows, "notes": notes,
        "random_weights": True,
    }


def table(p: dict) -> str:
    lines = [f"# weatherkd plan: {p['stage']} on {p['gpus']} GPUs ({p['nodes']} node(s)) of {p['gpu_mem_gb']:g} GB",
             f"trained parameters {p['trained_params'] / 1e6:.1f}M; frozen "
             + (", ".join(f"{k} {v / 1e6:.1f}M" for k, v in p["frozen_params"].items()) or "none")
             + ("; in fp32 " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in p["fp32_params"].items())
                if p["fp32_params"] else "")
             + ("; bf16 copies " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in p["bf16_params"].items())
                if p["bf16_params"] else "")
             + f" ({p['frozen_gb']:.2f} GB)",
             f"activations (measured, saved for backward): {p['activation_gb_per_sample']:.3f} GB per "
             f"{p['crop']}² sample in {p['mixed_precision'] if p['mixed_precision'] != 'no' else 'fp32'}; "
             f"{p['activation_gb_at_micro_batch']:.2f} GB at the config's micro-batch {p['micro_batch']}",
             "",
             "| strategy | model states GB/GPU | all at the config's micro-batch GB/GPU | largest micro-batch |",
             "|---|---|---|---|"]
    for name, row in p["strategies"].items():
        mark = " (launch file)" if name == p["launch_strategy"] else ""
        total = row["model_states_gb"] + p["frozen_gb"] + p["activation_fixed_gb"] + p["activation_gb_at_micro_batch"]
        lines.append(f"| {name}{mark} | {row['model_states_gb']:.2f} | {total:.2f} | {row['max_micro_batch']} |")
    lines.append(f"\nlargest micro-batch: what fits {p['gpu_mem_gb']:g} GB less {p['reserve_gb']:g} GB reserve. "
                 "Random weights at real size; model states counted as DeepSpeed's estimators do.")
    lines += [f"note: {n}" for n in p["notes"]]
    return "\n".join(lines)


def run_cli(args) -> int:
    config = Path(args.config)
    if not config.is_file():
        raise UserError(f"config file not found: {config}")
    stage = args.stage or config.parent.name
    if stage not in PLANNED:
        raise UserError(f"plan: {config} is not a config of a stage it plans (its folder is "
                        f"'{config.parent.name}'); plan covers {', '.join(PLANNED)}, or pass --stage")
    cfg = cfgmod.load(stages.get(stage).config_class, config, args.overrides)
    torch.manual_seed(0)
    result = plan(stage, cfg, read_launch(args.launch), args.gpu_mem)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0
