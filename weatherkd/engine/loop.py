"""The one training loop: every training stage (teacher, vq, distill, adapter) runs on it.

A stage defines a ``Recipe`` (model, frozen helpers, ``step(batch) -> losses``)
and calls ``Engine(cfg, MyRecipe, "name").fit()``. The engine seeds every RNG before it
builds the recipe, so model initialisation is reproducible too. The launch config decides whether this
is one process, DDP or DeepSpeed ZeRO; the loop reads the same either way:

    lock out_dir -> build -> resume -> [step -> log -> validate -> checkpoint -> preempted?]* -> export

Sharded generation jobs (synth, dream) are not trained: they share the job runner in
``weatherkd.jobs.runner``. prune, eval, report and bench are commands (``weatherkd.commands``).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.autograd.profiler import record_function

from weatherkd import config as cfgmod
from weatherkd import models, tracking
from weatherkd.data import stream
from weatherkd.data.stream import TrainSpec, eval_loader, train_loader
from weatherkd.engine import checkpoint, failpoints, validate
from weatherkd.engine import run_config as runcfg
from weatherkd.engine.preempt import EXIT_PREEMPTED, Preempted, Preemption
from weatherkd.engine.progress import Progress, StepStats, Window
from weatherkd.engine.nonfinite import NonFiniteGuard, NonFiniteTraining, held_weights, weights_finite
from weatherkd.engine.recipe import Recipe
from weatherkd.models import card
from weatherkd.engine.run_lock import RunLock, RunLocked
from weatherkd.engine.schedule import build_scheduler
from weatherkd.io import atomic_write_json
from weatherkd.logs import get_logger, progress
from weatherkd.placement import main_decides, make_accelerator
from weatherkd.precision import Precision, autocast

log = get_logger(__name__)
SYNC_DEBUG_ENV = "WEATHERKD_CUDA_SYNC_DEBUG"  # error | warn: see Engine.host_sync_check
PROGRESS_FILE = "progress.json"  # out_dir/progress.json: the latest logged step, rewritten at each log line


def build_accelerator(cfg) -> Accelerator:
    return make_accelerator(cfg.train.mixed_precision, cfg.train.grad_accum, tracking.log_with(cfg.tracker),
                            cfg.out_dir)


class Engine:
    PROFILE_LABELS = ("engine/backward", "engine/optimizer", "engine/ema")  # its parts of a step, as profiled
    def __init__(self, cfg, make_recipe: Callable[[Any], Recipe], stage: str, accelerator: Accelerator | None = None):
        """``stage``: the command's name (``weatherkd STAGE``), the W&B job type of its runs."""
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.acc = accelerator or build_accelerator(cfg)
        self.lock = RunLock(self.out_dir)
        self.hold_out_dir()
        set_seed(cfg.seed)
        self.recipe = make_recipe(cfg)
        self.stage = stage
        self.progress = Progress()
        self.saved_at: int | None = None  # the step of the checkpoint this process last wrote
        self.weathers: list[str] = []

    # ------------------------------------------------------------------ setup

    def hold_out_dir(self) -> None:
        """Rank 0 locks out_dir for the life of the run; every rank gets its answer, so a second
        run on a busy folder stops at once, on every rank, before it writes anything."""
        def acquire() -> None:
            try:
                self.lock.acquire()
            except OSError as e:  # e.g. a filesystem without flock
                raise RunLocked(f"cannot lock {self.lock.path}: {e}") from e

        main_decides(self.acc, acquire, RunLocked)

    @property
    def deepspeed(self) -> bool:
        return self.acc.state.deepspeed_plugin is not None

    @property
    def parallelism(self) -> str:
        """What actually ran, for metrics.json: e.g. ``deepspeed-zero2``, ``multi_cpu``, ``no``."""
        if self.deepspeed:
            return f"deepspeed-zero{self.acc.state.deepspeed_plugin.zero_stage}"
        return self.acc.state.distributed_type.value.lower()

    @property
    def zero3(self) -> bool:
        return self.deepspeed and self.acc.state.deepspeed_plugin.zero_stage == 3

    def setup(self) -> None:
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:  # config.yaml is written once resume() has compared it with the checkpoint's
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.precision = Precision.of(cfg.train, acc)
        for helper in self.recipe.helpers.values():
            self.precision.place(helper, acc.is_main_process)
        model, self.ema = self.precision.prepare_trained(self.recipe.model, cfg.train.ema_decay)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = self._optimizer(params)
        self.scheduler = build_scheduler(optimizer, cfg.train)
        if self.deepspeed:
            ds = acc.state.deepspeed_plugin.deepspeed_config
            # No DataLoader goes through prepare(), so DeepSpeed cannot infer these itself.
            ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
            if ds.get("gradient_clipping") == "auto":
                ds["gradient_clipping"] = cfg.train.grad_clip
        if cfg.train.compile:
            model = torch.compile(model)
        # The scheduler stays out of prepare(): accelerate would step it once per process.
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # Unwrapped once: accelerate's unwrap_model costs 1.3-1.6 ms a call here, and a step needs
        # it up to three times, a tenth of a tiny student's step.
        self.module = acc.unwrap_model(self.model)
        self.tracker = tracking.Tracker(acc, cfg.tracker, self.out_dir, cfgmod.to_dict(cfg), self.stage)
        self.preemption = Preemption(self.out_dir)
        self.nonfinite = NonFiniteGuard(acc.device, cfg.train.max_nonfinite_steps, acc.num_processes)

    def _optimizer(self, params):
        t = self.cfg.train
        offload = self.deepspeed and "offload_optimizer" in str(
            self.acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}))
        if offload:  # ZeRO-Offload steps the optimizer on the CPU; DeepSpeed's own Adam does that fast
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        # fused: its step takes the non-finite flag on the device (optimizer_step)
        return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=True)

    def _loaders(self):
        cfg, acc = self.cfg, self.acc
        d = cfg.data
        spec = TrainSpec.of(d)
        # An epoch is one checkpoint interval: a resume at a checkpoint starts a fresh epoch, with no replay.
        per_epoch = max(1, cfg.ckpt.every) * cfg.train.grad_accum
        self.train_loader = train_loader(d.train_shards, d.train_split, d.weathers, spec, cfg.seed,
                                         acc.process_index, acc.num_processes, per_epoch, d.num_workers,
                                         prepare=self.to_device)
        self.batches_per_epoch = per_epoch
        self.weathers = self.train_loader.stream.weathers
        self.eval_loader = eval_loader(d.eval_shards or d.train_shards, d.eval_split, d.weathers, acc.process_index,
                                       acc.num_processes, d.num_workers, d.eval_max_samples)

    def train_batches(self):
        """Micro-batches on the device (``to_device``), from the current data position onward, across epochs."""
        return self.train_loader.from_position(*divmod(self.progress.micro, self.batches_per_epoch))

    def to_device(self, batch: dict) -> dict:
        return stream.to_device(batch, self.acc.device, self.cfg.train.channels_last)

    # ------------------------------------------------------------------ the loop

    def build(self) -> None:
        """Everything before the first step: models, optimizer, tracker, loaders."""
        self.setup()
        self._loaders()

    def fit(self) -> dict:
        cfg, acc = self.cfg, self.acc
        self.build()
        self.resume()
        batches = self.train_batches()
        window = Window()
        bar = progress(total=cfg.train.max_steps, initial=self.progress.step, desc=f"{Path(cfg.out_dir).name}",
                       unit="step")
        metrics, start_step = None, self.progress.step
        while self.progress.step < cfg.train.max_steps:
            if self.progress.step % cfg.ckpt.preempt_check_every == 0:
                self.nonfinite.check(f"at step {self.progress.step}")  # the same host sync's cadence
            if self.progress.step % cfg.ckpt.preempt_check_every == 0 and self.preemption.requested(acc):
                self.stop_preempted(batches)
            window.add(self.train_step(batches, check_sync=self.progress.step > start_step))
            step = self.progress.step
            failpoints.reached("train.step", step)
            bar.update()
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                self.log_train(window, step)
                window = Window()
            last = step == cfg.train.max_steps
            if last or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
                metrics = self.validate(step)
            if last or step % cfg.ckpt.every == 0:
                self.save()
        batches.close()  # stops the loader's workers (and its prefetching thread)
        bar.close()
        if metrics is None:  # resumed at max_steps: nothing left to train, still report
            metrics = self.validate(self.progress.step)
        self.export()
        self.write_metrics(metrics)
        self.acc.wait_for_everyone()
        self.lock.release()
        self.tracker.finish()  # last: with W&B on, accelerate's end_training destroys the process group
        return metrics

    def stop_preempted(self, batches) -> None:
        """Checkpoint, then raise ``Preempted`` (the CLI exits 75, so SLURM requeues the job)."""
        self.save()
        if self.acc.is_main_process:
            self.preemption.clear()  # the requeued run must not stop again at once
        log.warning("preempted (%s) at step %d: checkpoint saved, exiting %d",
                    self.preemption.signal_name or "stop file", self.progress.step, EXIT_PREEMPTED)
        batches.close()
        self.tracker.finish()
        raise Preempted(f"preempted at step {self.progress.step}")

    def host_sync_check(self, steady: bool):
        """With ``WEATHERKD_CUDA_SYNC_DEBUG=error`` (or ``warn``), a steady-state step (any after the
        first of this process) whose forward, backward or optimizer step makes the host wait for
        the GPU raises (or warns). Outside it, logging, validation and checkpoints may sync, and so
        does torch's ``AveragedModel.update_parameters`` (EMA, history), which reads its counter on
        the host every step. No-op on CPU."""
        mode = os.environ.get(SYNC_DEBUG_ENV)
        if not (mode and steady and self.acc.device.type == "cuda"):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def checked():
            torch.cuda.set_sync_debug_mode(mode)
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(0)

        return checked()

    def train_step(self, batches, check_sync: bool = False) -> StepStats:
        """One optimizer step over ``grad_accum`` micro-batches, advancing ``self.progress``;
        skipped on every rank, on the device, when a loss term or the gradient norm is not finite
        on any rank (``nonfinite``)."""
        acc, model = self.acc, self.model
        model.train()
        totals: dict[str, torch.Tensor] = {}
        samples, data_s = 0, 0.0
        start = time.perf_counter()
        with self.host_sync_check(check_sync):
            for _ in range(self.cfg.train.grad_accum):
                t0 = time.perf_counter()
                batch = next(batches)  # already on the device: the loader prepared it ahead
                data_s += time.perf_counter() - t0
                self.progress.micro += 1
                with acc.accumulate(model):
                    with autocast(acc):  # the forward only: backward ops follow their forward's dtypes
                        losses = self.recipe.step(model, batch, self.progress.step)
                    if failpoints.poisoned("train.loss", self.progress.step + 1):
                        losses["loss"] = losses["loss"] * float("nan")
                    with record_function("engine/backward"):  # labels: what `bench kd-overhead` times
                        acc.backward(losses["loss"])  # under DeepSpeed, its engine steps here too
                for k, v in losses.items():
                    totals[k] = totals.get(k, 0) + v.detach().float() / self.cfg.train.grad_accum
                samples += batch["input"].shape[0]
            with record_function("engine/optimizer"):
                self.optimizer_step(totals)
        self.scheduler.step()
        self.progress.step += 1
        self.sync_buffers()
        if self.ema is not None:
            with self.gathered_params(), record_function("engine/ema"):
                self.ema.update_parameters(self.module)
        # Without an EMA the recipe reads the trained weights themselves, which ZeRO-3 partitions.
        reads_weights = self.ema is None and self.recipe.reads_weights_after(self.progress.step)
        with self.gathered_params() if reads_weights else contextlib.nullcontext():
            self.recipe.after_step(self.progress.step, self.module, self.ema_module)
        return StepStats(totals, samples, data_s, time.perf_counter() - start)

    def optimizer_step(self, losses: dict[str, torch.Tensor]) -> None:
        """Clip, then step, unless the step went non-finite on some rank: the fused optimizer reads
        that flag on the device (``found_inf``), so the host does not wait for it."""
        acc, step = self.acc, self.progress.step + 1
        scaled = self.precision.loss_scaled
        if self.deepspeed:  # its engine stepped inside backward; ZeRO skips non-finite gradients (norm inf)
            norm = self.model.get_global_grad_norm()
            norm = None if scaled or norm is None else torch.as_tensor(float(norm), device=acc.device)
            self.nonfinite.observe(losses, norm, step)
            return
        if self.cfg.train.grad_clip > 0:
            norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        found = self.nonfinite.observe(losses, None if scaled else norm, step)
        if acc.scaler is None:
            self.optimizer.optimizer.found_inf = found
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync_buffers(self) -> None:
        """Give every rank rank 0's floating buffers (BatchNorm statistics) after each step.

        DDP broadcasts buffers only at the start of the next forward, so right after a step each
        rank's BN statistics reflect its own batch. An EMA or a history model averaged from them
        would then differ across ranks, and a resume, which restores rank 0's copy everywhere,
        would stop being exact. DeepSpeed never broadcasts them: each rank's statistics would
        drift apart for the whole run.
        """
        if self.acc.num_processes == 1:
            return
        buffers = [b for b in self.module.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for b in buffers:  # copy_, not a view: buffers must keep their own storage
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()

    @property
    def ema_module(self):
        return self.ema.module if self.ema is not None else None

    def gathered_params(self):
        """Full parameters on every rank for the duration of the block (ZeRO-3 partitions them)."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    # ------------------------------------------------------------------ logging, validation

    def log_train(self, window: "Window", step: int) -> None:
        """One host sync per log interval, not per step: losses stay on device until here."""
        acc = self.acc
        names = sorted(window.sums)
        stacked = torch.stack([window.sums[k] for k in names]).to(acc.device)
        stacked = acc.reduce(stacked, reduction="mean")  # accelerate's collectives are no-ops in one process
        scalars = {f"train/{k}": v / window.steps for k, v in zip(names, stacked.tolist())}
        scalars["train/lr"] = self.scheduler.get_last_lr()[0]
        if window.total_s > 0:
            scalars["perf/samples_per_s"] = window.samples * acc.num_processes / window.total_s
            scalars["perf/data_wait_frac"] = window.data_s / window.total_s
        scalars["perf/max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_available():
            scalars["perf/max_cuda_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        scalars["data/corrupt_skipped"] = self.train_loader.corrupt
        self.tracker.log(scalars, step)
        if acc.is_main_process:  # for programs that follow a run (the demo's progress bars): not the log text
            atomic_write_json(self.out_dir / PROGRESS_FILE, {"step": step, "max_steps": self.cfg.train.max_steps,
                                                              "time": time.time(), **scalars})
        log.info("step %d  %s", step, "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in scalars.items()))

    def validate(self, step: int) -> dict:
        model = self.ema_module if self.ema is not None else self.model
        model.eval()
        custom = self.recipe.validate(model, self.eval_loader, self.acc, self.to_device)
        if custom is not None:
            self.tracker.log({f"val/{k}": v for k, v in custom.items() if isinstance(v, (int, float))}, step)
            log.info("validation at step %d: %s", step, custom)
            return custom
        result = validate.run(self.acc, lambda b: self.recipe.predict(model, b), self.eval_loader, self.weathers,
                              to_device=self.to_device)
        summary, images = result.summary, list(result.examples.values())
        summary["corrupt_skipped"] = result.corrupt
        scalars = {f"val/psnr/{w}": v["psnr"] for w, v in summary["weathers"].items()}
        scalars.update({f"val/ssim/{w}": v["ssim"] for w, v in summary["weathers"].items()})
        scalars.update({"val/psnr": summary["mean"]["psnr"], "val/ssim": summary["mean"]["ssim"]})
        self.tracker.log(scalars, step)
        if images and self.cfg.tracker.images_every_eval:
            self.tracker.log_images({"val/input_pred_target": images}, step)
        log.info("validation at step %d: PSNR %.2f dB (identity %.2f), SSIM %.4f over %d samples", step,
                 summary["mean"]["psnr"], summary["identity"]["mean"]["psnr"], summary["mean"]["ssim"], summary["n"])
        return summary

    # ------------------------------------------------------------------ checkpoints and export

    def state_dict(self) -> dict:
        """The engine's own state in a checkpoint, beside accelerate's model/optimizer/RNG files."""
        return {"config": cfgmod.to_dict(self.cfg), "progress": self.progress.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "recipe": self.recipe.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "nonfinite": self.nonfinite.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state["progress"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.recipe.load_state_dict(state["recipe"])
        if "nonfinite" in state:  # checkpoints from before the guard have none
            self.nonfinite.load_state_dict(state["nonfinite"])
        if self.ema is not None:
            if state["ema"] is None:
                raise checkpoint.CheckpointError("the checkpoint has no EMA state, but train.ema_decay > 0 now")
            self.ema.load_state_dict(state["ema"])

    def save(self) -> None:
        if self.saved_at == self.progress.step:  # e.g. a preemption right after a scheduled checkpoint
            return
        self.refuse_nonfinite(f"before checkpoint step-{self.progress.step:07d}")
        checkpoint.save(self.acc, self.ckpt_root, self.progress.step, self.cfg.ckpt.keep, self.state_dict())
        self.saved_at = self.progress.step

    def resume(self) -> None:
        """Rank 0 picks the newest checkpoint that verifies and holds no pickled code; every rank
        then loads it with torch.load forced to weights_only."""
        def choose() -> tuple[str | None, dict]:
            path = checkpoint.choose(self.cfg.resume, self.ckpt_root)
            if path is None:
                return None, {}
            checkpoint.refuse_pickled_code(path)
            return str(path), self.config_changes(path)

        path, changes = main_decides(self.acc, choose, checkpoint.CheckpointError)
        if path is not None:
            self.load_state_dict(checkpoint.load(self.acc, Path(path)))
            log.info("resumed from %s at step %d (target %d)", path, self.progress.step, self.cfg.train.max_steps)
        if self.acc.is_main_process:
            cfgmod.save(self.cfg, self.out_dir / "config.yaml")
            if changes:
                runcfg.record_changes(self.out_dir, self.progress.step, changes)

    def config_changes(self, path: Path) -> dict:
        """What this run's config changes against the checkpoint's (rank 0): keys that only
        extend or watch the run pass; one that defines it is refused unless resume_allow_changes."""
        saved = checkpoint.load_state_tree(path).get("config")
        if saved is None:  # a checkpoint from before the engine saved its config: the run's config.yaml
            saved = runcfg.read_saved(self.out_dir / "config.yaml")
        changes = runcfg.changes(runcfg.with_defaults(type(self.cfg), saved), cfgmod.to_dict(self.cfg))
        defining = runcfg.defining(changes)
        if defining and not self.cfg.resume_allow_changes:
            shown = "; ".join(f"{k}: {runcfg.short(changes[k][0])} -> {runcfg.short(changes[k][1])}" for k in defining)
            raise checkpoint.CheckpointError(
                f"resume from {path.name}: the config changes what the run is ({shown}); use a new out_dir, "
                "or pass resume_allow_changes=true to continue with them (recorded in config_history.json)")
        return changes

    def export(self) -> Path:
        """``out_dir/model/``: consolidated from ZeRO shards (every rank takes part), EMA weights if enabled."""
        acc = self.acc
        self.refuse_nonfinite("before the export")
        state = self.precision.export_state(acc, self.model, self.ema)
        path = self.out_dir / "model"
        if acc.is_main_process:
            extra = {"random_init": self.recipe.random_init, "step": self.progress.step,
                     "weathers": self.weathers, **self.recipe.export_extra()}
            module, state = self.recipe.export_model(self.module, state)
            models.save(module, path, state_dict=state, extra=extra)
            card.write_at_export(path, self.stage, cfgmod.to_dict(self.cfg))
            log.info("exported %s", path)
        acc.wait_for_everyone()
        self.recipe.after_export(self, path)
        return path

    def refuse_nonfinite(self, where: str) -> None:
        """Nothing non-finite is written: too many skipped steps, or weights (the EMA's too) that
        are not finite, stop the run on every rank, leaving the checkpoints as they are."""
        self.nonfinite.check(where)
        weights = [held_weights(p, self.acc.process_index) for p in self.module.parameters()]
        if self.ema is not None:
            weights += list(self.ema.module.parameters())
        if not weights_finite(weights, self.acc.device, self.acc.num_processes):
            raise NonFiniteTraining(f"step {self.progress.step}: the weights are not finite; stopped {where}, "
                                    "nothing written since the last checkpoint")

    def rank_checksums(self) -> list[str]:
        """A hash of every rank's trained parameters and floating buffers (batch norm's
        statistics). They must all agree; a launch that silently runs unsynchronised ranks (see
        docs/launching.md) shows up here."""
        digest = hashlib.sha256()
        with self.gathered_params():
            module = self.module
            for t in itertools.chain(module.parameters(), (b for b in module.buffers() if b.is_floating_point())):
                digest.update(t.detach().float().cpu().numpy().tobytes())
        return gather_object([digest.hexdigest()])

    def write_metrics(self, metrics: dict) -> None:
        checksums = self.rank_checksums()
        devices = gather_object([str(self.acc.device)])
        in_sync = len(set(checksums)) == 1
        if not in_sync:
            log.error("parameters differ across ranks at the end of training: %s", checksums)
        if self.acc.is_main_process:
            atomic_write_json(self.out_dir / "metrics.json",
                              {**metrics, "random_init": self.recipe.random_init, "step": self.progress.step,
                               "world_size": self.acc.num_processes, "parallelism": self.parallelism,
                               "ranks_in_sync": in_sync, "rank_devices": devices,
                               "nonfinite_steps_skipped": int(self.nonfinite.skipped.item()),
                               "rank_checksums": checksums})

