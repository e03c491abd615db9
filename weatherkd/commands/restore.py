"""`weatherkd restore`: a trained model on your own photos, of any size, in the usual formats.

``--model`` is an exported model folder (any arch: the teacher, TransWeather, the students, a
pruned model) or a ``weatherkd export`` file (``.onnx``, run through onnxruntime), so the artefact
you deploy is checked the same way.

- Inputs are files, folders (recursive; non-image files are ignored) and globs. Each output keeps
  its input's folder relative to the input root and its file stem, and is written atomically.
- Under ``accelerate launch`` the sorted file list is split by rank, so each file is restored by
  exactly one process. A rerun skips outputs that exist (``--overwrite`` redoes them).
- Images larger than the tile go through overlapping, blended tiles (``models.tiling``). Images
  of one size are batched; decoding and writing run in threads beside the model.
- An unreadable file is named, counted and skipped; the command then exits 1.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import itertools
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from weatherkd import models
from weatherkd.data import image_files
from weatherkd.data.samples import BadImage
from weatherkd.errors import UserError
from weatherkd.io import atomic_write_bytes
from weatherkd.logs import get_logger, progress
from weatherkd.models import deployed
from weatherkd.models.tiling import default_tiling, tiled
from weatherkd.placement import place
from weatherkd.precision import dtype_named

log = get_logger(__name__)


@dataclass(frozen=True)
class Job:
    src: Path
    dst: Path
    compare: Path | None


def find_inputs(inputs: list[str], out: Path | None = None) -> list[tuple[Path, Path]]:
    """(file, its path relative to the input it came from) for every file, folder and glob named.
    A folder contributes its image files only; a file named directly is always tried. Where
    ``out`` lies inside a folder, the files under it are outputs, not inputs (a rerun with
    ``--out photos/restored``); ``out`` equal to an input folder is left to the overwrite check."""
    found: dict[Path, Path] = {}
    out = out.resolve() if out is not None else None

    def add(f: Path, rel: Path) -> None:
        found.setdefault(f.resolve(), rel)

    def add_folder(folder: Path) -> None:
        inside = out is not None and out != folder.resolve() and out.is_relative_to(folder.resolve())
        for f in sorted(folder.rglob("*")):
            if f.is_file() and image_files.is_image_name(f):
                if inside and f.resolve().is_relative_to(out):
                    continue
                add(f, f.relative_to(folder))

    for item in map(str, inputs):
        path = Path(item)
        if glob.has_magic(item) and not path.exists():  # a file named "a[1].png" is a file
            parts = Path(item).parts
            root = Path(*parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))] or ["."])
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"{item}: no file matches this pattern")
            for m in map(Path, matches):
                if m.is_dir():
                    add_folder(m)
                elif image_files.is_image_name(m):
                    add(m, m.relative_to(root))
        elif path.is_dir():
            add_folder(path)
        elif path.is_file():
            add(path, Path(path.name))
        else:
            raise UserError(f"{item}: no such file or folder")
    if not found:
        raise UserError(f"no image files in {' '.join(map(str, inputs))} "
                        f"(looked for {', '.join(image_files.READ_SUFFIXES)})")
    return sorted(found.items())


def jobs_for(found: list[tuple[Path, Path]], out: Path, fmt: str, compare: bool) -> list[Job]:
    """Where each input goes. Two inputs with one stem in one folder (a.jpg, a.png) keep their
    suffix in the name (a_jpg.png, a_png.png); an output never lands on an input."""
    ext = image_files.WRITE_FORMATS[fmt]
    stems: dict[Path, int] = {}
    for _, rel in found:
        stems[rel.with_suffix("")] = stems.get(rel.with_suffix(""), 0) + 1
    inputs = {src for src, _ in found}
    jobs, written = [], {}
    for src, rel in found:
        stem = rel.with_suffix("")
        if stems[stem] > 1:
            stem = stem.with_name(f"{stem.name}_{rel.suffix[1:]}")
        dst = out / stem.parent / f"{stem.name}{ext}"
        job = Job(src, dst, dst.with_name(f"{stem.name}_compare{ext}") if compare else None)
        for path in filter(None, (job.dst, job.compare)):
            if path.resolve() in inputs:
                raise UserError(f"--out {out}: restoring {src} would overwrite the input {path}; "
                                "choose another --out folder")
            if path.resolve() in written:
                raise UserError(f"{src} and {written[path.resolve()]} would both be written to {path}; "
                                "restore them into different --out folders")
            written[path.resolve()] = src
        jobs.append(job)
    return jobs


def load_model(path, device: torch.device):
    """An exported model folder or file, in eval mode on ``device``, with no gradients."""
    path = Path(path)
    if path.is_dir():
        model = models.load(path).eval()
        models.check_restores_images(model, path)
        model.requires_grad_(False)
        return model.to(device)
    if path.suffix in deployed.SUFFIXES:
        return deployed.load(path, device)
    if path.exists():
        raise UserError(f"{path}: not an exported model (a model folder, or a .onnx file)")
    raise UserError(f"{path}: no such model folder or file")


class Restorer:
    """Batches of equal-size photos through the model: device, precision and memory layout."""

    def __init__(self, model, device: torch.device, precision: str, tile, overlap: int, batch_size: int):
        self.model, self.device, self.batch_size = model, device, batch_size
        self.torch_model = isinstance(model, torch.nn.Module)  # an ONNX graph runs as exported, in fp32
        self.precision = precision if self.torch_model else "fp32"
        self.tile, self.overlap = tile, overlap
        self.channels_last = device.type == "cuda" and self.torch_model
        if self.channels_last:
            model.to(memory_format=torch.channels_last)

    def dtype(self, photos: list[image_files.Photo]) -> torch.dtype:
        """``auto`` keeps 16-bit photos in fp32: fp16's 11-bit mantissa would cost them precision."""
        if self.precision == "auto" and any(p.bits == 16 for p in photos):
            return torch.float32
        return dtype_named(self.precision, self.device)

    def __call__(self, photos: list[image_files.Photo]) -> list[np.ndarray]:
        x = torch.from_numpy(np.stack([p.rgb for p in photos])).permute(0, 3, 1, 2)
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = self.dtype(photos)
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        try:
            with torch.no_grad(), autocast:
                y = tiled(self.model, x, self.tile, self.overlap, max_batch=self.batch_size)
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory restoring {len(photos)} image(s) of {x.shape[-2]}x{x.shape[-1]} in "
                            f"tiles of {self.tile}: lower --tile or --batch-size") from None
        y = y.float()
        if not torch.isfinite(y).all():  # fp16 overflow would be written as black pixels
            raise ValueError(f"the output has non-finite values in {dtype}; try --precision fp32")
        return list(y.clamp_(0, 1).permute(0, 2, 3, 1).cpu().numpy())


@dataclass
class Counts:
    """What one launch did, image by image; ``failures`` names each image that failed and why."""
    restored: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failures.append(why)
        self.failed += 1
        log.warning("%s", why, extra={"all_ranks": True})

    def across_ranks(self, world_size: int) -> Counts:
        """Every rank's counts summed (seconds: the slowest rank's)."""
        if world_size == 1:
            return self
        from accelerate.utils import gather_object

        every: list[Counts] = gather_object([self])
        return Counts(sum(c.restored for c in every), sum(c.skipped for c in every), sum(c.failed for c in every),
                      max(c.seconds for c in every), [f for c in every for f in c.failures])


Decoded = tuple[Job, image_files.Photo]


def read_ahead(todo: list[Job], counts: Counts, workers: int, ahead: int, bar) -> Iterator[Decoded]:
    """Each job's photo, in order, decoded ``ahead`` files in advance; an unreadable file is counted."""
    with ThreadPoolExecutor(workers) as readers:
        queue = iter(todo)
        decoding = collections.deque((job, readers.submit(image_files.read, job.src))
                                     for job in itertools.islice(queue, ahead))
        while decoding:
            job, future = decoding.popleft()
            for nxt in itertools.islice(queue, 1):
                decoding.append((nxt, readers.submit(image_files.read, nxt.src)))
            try:
                yield job, future.result()
            except BadImage as e:
                counts.fail(f"skipped {e}")
                bar.update(1)


def same_size_batches(photos: Iterable[Decoded], batch_size: int) -> Iterator[list[Decoded]]:
    """Runs of up to ``batch_size`` photos of one size (the inputs come sorted by size)."""
    batch: list[Decoded] = []
    for item in photos:
        if batch and (item[1].shape != batch[0][1].shape or len(batch) == batch_size):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def restored(batches: Iterable[list[Decoded]], restorer: Restorer, counts: Counts, bar
             ) -> Iterator[tuple[Job, image_files.Photo, np.ndarray]]:
    """Each batch through the model; a batch the model fails on is counted, and the rest go on."""
    for batch in batches:
        try:
            outputs = restorer([photo for _, photo in batch])
        except UserError:
            raise  # out of memory: the same for every batch that follows
        except Exception as e:  # a graph or model that fails on these images: name them, go on
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            for job, _ in batch:
                counts.fail(f"{job.src}: the model failed on it ({reason})")
            bar.update(len(batch))
            continue
        for (job, photo), output in zip(batch, outputs):
            yield job, photo, output


def _write(job: Job, photo: image_files.Photo, restored: np.ndarray, fmt: str, quality: int) -> list[str]:
    out = image_files.Photo(restored, photo.alpha, photo.bits, photo.gray)
    data, lost = image_files.encode(out, fmt, quality)
    atomic_write_bytes(job.dst, data)
    if job.compare is not None:
        side = image_files.Photo(np.concatenate([photo.rgb, restored], axis=1),
                                 None if photo.alpha is None else np.concatenate([photo.alpha, photo.alpha], axis=1),
                                 photo.bits, photo.gray)
        atomic_write_bytes(job.compare, image_files.encode(side, fmt, quality)[0])
    return lost


def write_all(results: Iterable[tuple[Job, image_files.Photo, np.ndarray]], counts: Counts, fmt: str,
              quality: int, ahead: int, bar) -> set[str]:
    """Encode and write on a thread beside the model, at most ``ahead`` images behind it; returns
    what the format could not keep (alpha, 16 bits), once per kind."""
    lost: set[str] = set()
    with ThreadPoolExecutor(1) as writer:
        writing: collections.deque = collections.deque()

        def finish_one() -> None:
            job, future = writing.popleft()
            try:
                lost.update(future.result())
                counts.restored += 1
            except (OSError, ValueError) as e:  # a full disk, or an encoder refusing the image
                counts.fail(f"{job.dst}: cannot write ({e})")
            bar.update(1)

        for job, photo, output in results:
            writing.append((job, writer.submit(_write, job, photo, output, fmt, quality)))
            while len(writing) > ahead:
                finish_one()
        while writing:
            finish_one()
    return lost


def restore(model_path, inputs: list[str], out, fmt: str = "png", quality: int = 95, tile=None,
            overlap: int | None = None, batch_size: int = 4, precision: str = "auto", compare: bool = False,
            overwrite: bool = False, workers: int = 2) -> Counts:
    """Restore every image named by ``inputs`` into ``out``: read ahead, group same-size images,
    restore, write. Returns this launch's counts, summed over ranks."""
    if fmt not in image_files.WRITE_FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(image_files.WRITE_FORMATS)}")
    jobs = jobs_for(find_inputs(inputs, Path(out)), Path(out), fmt, compare)  # one-line errors before anything loads
    where = place()
    model = load_model(model_path, where.device)
    model_tile, model_overlap = default_tiling(model)
    if getattr(model, "fixed", None):  # a fixed-shape graph takes its own tile size and no other
        if tile and tile != model.fixed:
            log.warning("--tile %s ignored: %s takes %sx%s inputs only", tile, model_path, *model.fixed)
        tile = model.fixed
    tile = tile or model_tile
    overlap = model_overlap if overlap is None else overlap
    if not 0 <= overlap < min((tile, tile) if isinstance(tile, int) else tile):
        raise UserError(f"--overlap must be at least 0 and below the tile ({tile}), got {overlap}")
    restorer = Restorer(model, where.device, precision, tile, overlap, batch_size)

    mine = jobs[where.rank::where.world_size]  # split before looking at the disk: every rank sees the same list
    todo = [j for j in mine if overwrite or not (j.dst.exists() and (j.compare is None or j.compare.exists()))]
    todo.sort(key=lambda j: (image_files.header_size(j.src), str(j.src)))  # equal sizes side by side, for batching
    counts = Counts(skipped=len(mine) - len(todo))
    start = time.perf_counter()
    ahead = 2 * batch_size + workers  # decoded photos waiting, and restored ones being written, at most
    # closing: out of memory ends the chain early, and the readers' threads must stop with it
    with progress(total=len(todo), desc="restore", unit="img") as bar, \
            contextlib.closing(read_ahead(todo, counts, workers, ahead, bar)) as photos:
        results = restored(same_size_batches(photos, batch_size), restorer, counts, bar)
        lost = write_all(results, counts, fmt, quality, ahead, bar)
    for note in sorted(lost):
        log.warning("--format %s: %s; written without it", fmt, note)
    counts.seconds = time.perf_counter() - start
    if where.world_size > 1:
        log.info("rank %d of %d: restored %d, skipped %d, failed %d", where.rank, where.world_size,
                 counts.restored, counts.skipped, counts.failed, extra={"all_ranks": True})
    return counts.across_ranks(where.world_size)


def run_cli(args) -> int:
    if args.tile and (len(args.tile) > 2 or min(args.tile) < 16):
        raise UserError("--tile takes one side, or a height and a width, of at least 16 pixels")
    if args.batch_size < 1 or args.workers < 1:
        raise UserError("--batch-size and --workers must be at least 1")
    tile = tuple(args.tile) if args.tile and len(args.tile) == 2 else (args.tile[0] if args.tile else None)
    counts = restore(args.model, args.inputs, args.out, args.format, args.quality, tile, args.overlap,
                     args.batch_size, args.precision, args.compare, args.overwrite, args.workers)
    from weatherkd.logs import is_main_process

    if is_main_process():
        rate = counts.restored / counts.seconds if counts.seconds > 0 else 0.0
        print(f"restored {counts.restored}, skipped {counts.skipped}, failed {counts.failed}, "
              f"{rate:.2f} images/s -> {args.out}")
    return 1 if counts.failed else 0
