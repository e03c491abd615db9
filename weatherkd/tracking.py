"""Experiment tracking through Accelerate's W&B tracker, on the main process only.

- ``tracker.kind: none`` logs nowhere.
- With no W&B API key configured, W&B runs offline and writes under
  ``out_dir/wandb`` (sync later with ``wandb sync``).
- The run id is kept in ``out_dir/wandb_run_id``, so a resumed run appends
  to the same W&B run instead of starting a new one.
- All runs of one pipeline share a W&B group (``tracker.group``, else ``$WEATHERKD_PIPELINE``);
  each run's ``job_type`` is its stage, and its name says stage and pipeline.
- Commands that are not on the engine (``eval``, ``report``) log their tables and images to a
  run of their own in the same group (``log_tables``).
"""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path

import numpy as np

from weatherkd.config import TrackerConfig
from weatherkd.io import atomic_write_text
from weatherkd.logs import get_logger

log = get_logger(__name__)

RUN_ID_FILE = "wandb_run_id"
PIPELINE_ENV = "WEATHERKD_PIPELINE"


def pipeline_group(cfg: TrackerConfig | None = None) -> str | None:
    return (cfg.group if cfg is not None and cfg.group else None) or os.environ.get(PIPELINE_ENV) or None


def wanted(choice: str) -> bool:
    """A command's ``--tracker`` choice: wandb, none, or auto (W&B inside a pipeline only)."""
    return choice == "wandb" or (choice == "auto" and pipeline_group() is not None)


def run_name(stage: str, out_dir: Path, group: str | None, name: str | None = None) -> str:
    """``<pipeline>/<out_dir name>``, with the stage prefixed when the folder's name lacks it."""
    if name:
        return name
    leaf = out_dir.name if stage in out_dir.name else f"{stage}-{out_dir.name}"
    return f"{group}/{leaf}" if group else leaf


def log_with(cfg: TrackerConfig) -> list[str] | None:
    """The ``log_with`` argument for ``Accelerator(...)``."""
    return ["wandb"] if cfg.kind == "wandb" else None


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(cfg: TrackerConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if has_wandb_key() else "offline"


def _run_id(out_dir: Path) -> str:
    path = out_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id)
    return run_id


class Tracker:
    """Logs scalars and images for one run; a no-op on non-main ranks and with ``kind: none``."""

    def __init__(self, accelerator, cfg: TrackerConfig, out_dir, run_config: dict, stage: str = "train"):
        self.accelerator = accelerator
        self.enabled = cfg.kind == "wandb"
        self.run_dir: Path | None = None
        if not self.enabled:
            return
        out_dir = Path(out_dir)
        mode = resolve_mode(cfg)
        run_id = _run_id(out_dir) if accelerator.is_main_process else None
        group = pipeline_group(cfg)
        init = {"dir": str(out_dir), "id": run_id, "resume": "allow", "mode": mode, "group": group,
                "job_type": stage, "name": run_name(stage, out_dir, group, cfg.name), "tags": cfg.tags}
        accelerator.init_trackers(cfg.project, config=run_config, init_kwargs={"wandb": init})
        if accelerator.is_main_process:
            run = accelerator.get_tracker("wandb", unwrap=True)
            self.run_dir = Path(run.dir).parent  # .../wandb/{offline-,}run-<time>-<id>
            log.info("W&B %s run %s in %s", mode, run_id, self.run_dir)

    def log(self, scalars: dict, step: int) -> None:
        if self.enabled:
            self.accelerator.log({k: float(v) for k, v in scalars.items()}, step=step)

    def log_images(self, images: dict[str, list[np.ndarray]], step: int) -> None:
        """``images``: name -> list of uint8 H×W×3 arrays."""
        if self.enabled and self.accelerator.is_main_process:
            self.accelerator.get_tracker("wandb").log_images(images, step=step)

    def finish(self) -> None:
        if self.enabled:
            self.accelerator.end_training()


def log_tables(stage: str, out_dir, tables: dict[str, tuple[list[str], list[list]]],
               images: dict[str, np.ndarray] | None = None, cfg: TrackerConfig | None = None) -> Path | None:
    """One W&B run (job type ``stage``) holding ``tables`` (name -> columns, rows) and ``images``
    (name -> uint8 H×W×3), in the pipeline's group; offline under ``out_dir`` without an API key.
    A rerun into the same ``out_dir`` updates the same run (its id is kept there). Returns the
    run's folder, or None when W&B fails: the results are on disk already, so that is a warning.
    Call it on the main process only."""
    import wandb

    cfg = cfg or TrackerConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    group = pipeline_group(cfg)
    try:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", cfg.project), group=group, job_type=stage,
                         dir=str(out_dir), mode=resolve_mode(cfg), id=_run_id(out_dir), resume="allow",
                         name=run_name(stage, out_dir, group, cfg.name), tags=cfg.tags)
        try:
            record = {name: wandb.Table(columns=columns, data=rows) for name, (columns, rows) in tables.items()}
            record.update({name: wandb.Image(image) for name, image in (images or {}).items()})
            run.log(record)
            return Path(run.dir).parent
        finally:
            run.finish()
    except Exception as e:  # noqa: BLE001 - e.g. online mode on a compute node without internet
        log.warning("W&B logging of %s failed (%s: %s); the results are in %s", stage, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "", out_dir)
        return None
