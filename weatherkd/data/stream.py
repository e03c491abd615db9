"""WebDataset pipelines that stay correct under DDP.

Train: shards are resampled with a generator seeded from (seed, epoch, rank,
worker), so a run is reproducible and a resume replays the same stream. Each
rank yields exactly ``batches_per_epoch`` batches whatever the shard count, so
no rank waits on a collective its peers never reach.

Eval: the manifest's sample counts cut the split into equal contiguous slices,
one per (rank, worker). Short slices wrap around and mark the extra samples
``valid=False``. Every sample is seen exactly once across ranks and workers
with any shard count, and every rank runs the same number of forwards, which
ZeRO-3's parameter gathering needs.

Neither loader goes through ``accelerator.prepare``: it would re-shard or
broadcast what these pipelines already split.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import signal
import threading
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from weatherkd.data.augment import cutmix_weathers, paired_crop_flip
from weatherkd.data.samples import IMAGE_FIELDS, CorruptSample, decode_sample
from weatherkd.data.shards import ShardSet, ShardSetError, open_set
from weatherkd.logs import get_logger

log = get_logger(__name__)


def _worker_init(_: int) -> None:
    # torchrun and SLURM signal the whole process group. Workers leave preemption to their
    # trainer, which checkpoints and then shuts them down; a worker killed by SIGTERM would
    # crash the trainer before it can save. (Orphaned workers still exit: DataLoader's
    # watchdog ends them when their parent is gone.)
    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _loader(dataset: IterableDataset, num_workers: int, **kwargs) -> DataLoader:
    # Its own generator: creating an iterator must not draw from the global torch RNG, or a
    # resumed run's model-side randomness would drift from the uninterrupted run's.
    # Workers come from a forkserver: a trainer has live threads (gloo, queue feeders, tqdm), and a
    # plain fork() taken while one of them holds a lock was seen to hang an eval worker forever.
    if num_workers:
        kwargs.update(worker_init_fn=_worker_init, multiprocessing_context=_forkserver())
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, generator=torch.Generator(), **kwargs)


def _forkserver():
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["weatherkd.data.loader_server", "torch", "webdataset", "weatherkd.data.stream"])
    return ctx


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """H×W×C uint8 -> C×H×W uint8. Images stay uint8 through the workers, the queue between
    processes and the copy to the device (a quarter of float32's bytes); ``to_device`` makes them
    float there."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


def to_device(batch: dict, device, channels_last: bool = False) -> dict:
    """A loader batch on ``device``: its uint8 images as float in [0, 1] (converted there, after the
    copy), its other tensors as they are; 4-D tensors channels_last when asked."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.dtype == torch.uint8:
                v = v.float().div_(255.0)
            if channels_last and v.ndim == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


class _Corrupt:
    """Counts undecodable samples in one worker; the count rides along with each batch."""

    def __init__(self):
        self.count = 0

    def skip(self, error: Exception) -> None:
        self.count += 1
        log.warning("skipping corrupt sample (%d so far in this worker): %s", self.count, error,
                    extra={"all_ranks": True})


def _raw_samples(urls, corrupt: _Corrupt):
    """Raw tar samples from a sequence of shard urls, via webdataset's streaming tar reader."""

    def on_tar_error(exn):  # an unreadable tar member: count it, keep streaming
        corrupt.skip(exn)
        return True

    return wds.tarfile_to_samples(handler=on_tar_error)({"url": u} for u in urls)


def _decoded(raw_iter, corrupt: _Corrupt):
    for raw in raw_iter:
        try:
            yield decode_sample(raw)
        except CorruptSample as e:
            corrupt.skip(e)


def _shuffled(items, size: int, rng: np.random.Generator):
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def _collate(samples: list[dict], n_weathers: int) -> dict:
    batch = {f: torch.stack([s[f] for s in samples]) for f in IMAGE_FIELDS if f in samples[0]}
    batch["weather"] = torch.tensor([s["weather"] for s in samples], dtype=torch.long)
    batch["weather_soft"] = torch.nn.functional.one_hot(batch["weather"], n_weathers).float()
    batch["key"] = [s["__key__"] for s in samples]
    return batch


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


@dataclass
class TrainSpec:
    crop: int = 64
    batch_size: int = 8
    shuffle_buffer: int = 1024  # config.DataConfig's default; stages set it from their config
    flip: bool = True
    cutmix_prob: float = 0.0
    cutmix_max_frac: float = 0.5

    @classmethod
    def of(cls, data, **changes) -> "TrainSpec":
        """What a stage's ``data`` config section says (its fields of the same names), with ``changes``."""
        return cls(**{**{f.name: getattr(data, f.name) for f in dataclasses.fields(cls)}, **changes})


class TrainStream(IterableDataset):
    """A resampled stream cut into epochs of a fixed number of batches per rank, from a position
    (``epoch``, ``skip`` batches into it) onward: ``epochs`` of them, or without end when None."""

    def __init__(self, shard_set: ShardSet, split: str, weathers: list[str] | None, spec: TrainSpec,
                 seed: int, rank: int, world_size: int, batches_per_epoch: int):
        self.urls = shard_set.urls(split, weathers)
        if not self.urls:
            raise ShardSetError(f"{shard_set.dir}: no '{split}' shards for weathers {weathers}")
        self.weathers = list(shard_set.weathers)
        self.n_weathers = len(self.weathers)
        self.spec, self.seed, self.rank, self.world_size = spec, seed, rank, world_size
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.skip = 0  # global batches of the first epoch already consumed (a mid-epoch resume)
        self.epochs: int | None = 1

    def _worker_batches(self, worker: int, n_workers: int, total: int) -> int:
        # DataLoader interleaves workers round-robin, so global batch g comes from worker g % n_workers.
        return total // n_workers + (worker < total % n_workers)

    def __iter__(self):
        physical, n_workers = _worker()
        epoch, handed_out = self.epoch, -self.skip
        while self.epochs is None or epoch < self.epoch + self.epochs:
            # The loader hands out batches round-robin from worker 0 and never restarts it between
            # epochs, so the worker whose turn comes first in an epoch takes over that epoch's role 0.
            # ``handed_out`` counts from where the first epoch's batch 0 would have been.
            worker = (physical - handed_out) % n_workers
            skip = self.skip if epoch == self.epoch else 0
            yield from self._epoch(epoch, worker, physical, n_workers, skip)
            handed_out += self.batches_per_epoch
            epoch += 1

    def _epoch(self, epoch: int, worker: int, physical: int, n_workers: int, skip_total: int):
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        corrupt = _Corrupt()
        urls = (self.urls[i] for i in iter(lambda: int(rng.integers(len(self.urls))), None))
        samples = _shuffled(_decoded(_raw_samples(urls, corrupt), corrupt), self.spec.shuffle_buffer, rng)
        n = self._worker_batches(worker, n_workers, self.batches_per_epoch)
        skip = self._worker_batches(worker, n_workers, skip_total)
        for b in range(n):
            items = []
            for s in samples:
                s = paired_crop_flip(s, self.spec.crop, rng, self.spec.flip)
                for f in IMAGE_FIELDS:
                    if f in s:
                        s[f] = _to_tensor(s[f])
                items.append(s)
                if len(items) == self.spec.batch_size:
                    break
            batch = cutmix_weathers(_collate(items, self.n_weathers), rng, self.spec.cutmix_prob,
                                    self.spec.cutmix_max_frac)
            if b < skip:  # replayed only to advance the generator exactly as the first run did
                continue
            batch["__epoch__"], batch["__worker__"], batch["__corrupt__"] = epoch, physical, corrupt.count
            yield batch


class _CorruptTally:
    def __init__(self):
        self.per_worker: dict[int, int] = {}

    def update(self, batch: dict) -> None:
        self.per_worker[batch.pop("__worker__")] = batch.pop("__corrupt__")

    @property
    def total(self) -> int:
        return sum(self.per_worker.values())


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def _ahead(batches, prepare, depth: int = 2):
    """``prepare(batch)`` for each of ``batches``, taken in a background thread up to ``depth`` ahead
    of the consumer, in order. Receiving a batch from the workers (unpickling it, mapping its shared
    memory, which costs milliseconds per batch here) and moving it to the device then overlap the
    step instead of adding to it."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill():
        try:
            for batch in batches:
                if not put(prepare(batch)):
                    return
            put(_END)
        except BaseException as e:  # raised again in the consumer, where the loop can handle it
            put(_Failed(e))

    thread = threading.Thread(target=fill, name="weatherkd-batches", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        # The thread holds the loader's iterator: it must let go (its workers shut down when it is
        # collected) before the process exits, or exit would wait on workers that ignore SIGTERM.
        stop.set()
        thread.join(timeout=60)


class TrainLoader:
    """Batches of a ``TrainStream``; ``corrupt`` counts the samples skipped. With loader workers, a
    background thread receives their batches and ``prepare``s them (the engine's ``to_device``)
    ahead of the step."""

    def __init__(self, stream: TrainStream, num_workers: int, prepare=None):
        self.stream = stream
        self.num_workers = num_workers
        self.prepare = prepare
        self.loader = _loader(stream, num_workers, prefetch_factor=4 if num_workers else None,
                              pin_memory=torch.cuda.is_available())
        self.corrupt_by_epoch: dict[int, _CorruptTally] = {}

    @property
    def corrupt(self) -> int:
        return sum(t.total for t in self.corrupt_by_epoch.values())

    def epoch(self, epoch: int, skip: int = 0):
        """Epoch ``epoch`` alone, from batch ``skip`` on."""
        return self._batches(epoch, skip, 1)

    def from_position(self, epoch: int, skip: int = 0):
        """Every epoch from (``epoch``, ``skip``) on, without end, from one set of workers: they
        never stop to restart, so an epoch boundary (a checkpoint) does not drain the pipeline."""
        return self._batches(epoch, skip, None)

    def _batches(self, epoch: int, skip: int, epochs: int | None):
        self.stream.epoch, self.stream.skip, self.stream.epochs = epoch, skip, epochs
        prepare = self.prepare or (lambda batch: batch)
        # The loader's iterator is made here, in the consumer's thread: it starts the workers and
        # the pin-memory thread on this thread's device (a new thread's would be device 0).
        batches = _ahead(iter(self.loader), prepare) if self.num_workers else (prepare(b) for b in self.loader)
        try:
            for batch in batches:
                self.corrupt_by_epoch.setdefault(batch.pop("__epoch__"), _CorruptTally()).update(batch)
                yield batch
        finally:
            batches.close()


def train_loader(path, split: str, weathers, spec: TrainSpec, seed: int, rank: int, world_size: int,
                 batches_per_epoch: int, num_workers: int, prepare=None) -> TrainLoader:
    shard_set = open_set(path, split)
    stream = TrainStream(shard_set, split, weathers, spec, seed, rank, world_size, batches_per_epoch)
    return TrainLoader(stream, num_workers, prepare)


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


class EvalStream(IterableDataset):
    """Every sample exactly once across all (rank, worker) slots; one sample per batch, full size."""

    def __init__(self, shard_set: ShardSet, split: str, weathers: list[str] | None, rank: int, world_size: int,
                 num_workers: int, max_samples: int = 0):
        self.shards = shard_set.shards(split, weathers)
        self.dir = shard_set.dir
        self.total = sum(s["count"] for s in self.shards)
        if max_samples:
            self.total = min(self.total, max_samples)
        if self.total == 0:
            raise ShardSetError(f"{shard_set.dir}: the '{split}' split is empty")
        self.n_weathers = len(shard_set.weathers)
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.per_slot = math.ceil(self.total / (world_size * self.num_workers))

    def __len__(self) -> int:
        """Batches this rank yields (the same on every rank)."""
        return self.per_slot * self.num_workers

    def _read_range(self, start: int, stop: int, corrupt: _Corrupt):
        """Global sample indices [start, stop) in manifest order; corrupt ones come back as None."""
        offset = 0
        for s in self.shards:
            lo, hi = offset, offset + s["count"]
            offset = hi
            if hi <= start or lo >= stop:
                continue
            for i, raw in enumerate(_raw_samples([str(self.dir / s["file"])], corrupt)):
                if lo + i >= stop:
                    break
                if lo + i < start:
                    continue
                try:
                    yield decode_sample(raw)
                except CorruptSample as e:
                    corrupt.skip(e)
                    yield None

    def __iter__(self):
        worker, _ = _worker()
        slot = self.rank * self.num_workers + worker
        first = slot * self.per_slot
        wanted = [(g, g % self.total) for g in range(first, first + self.per_slot)]
        corrupt = _Corrupt()
        valid_run = [g for g, _ in wanted if g < self.total]
        ranges = []
        if valid_run:
            ranges.append((valid_run[0], valid_run[-1] + 1, True))
        padding = len(wanted) - len(valid_run)
        if padding:
            ranges.append((0, padding, False))  # wrap-around padding keeps forward counts equal
        for start, stop, valid in ranges:
            # Padding re-reads samples another slot owns; a corrupt one there is that slot's to count.
            counter = corrupt if valid else _Corrupt()
            for sample in self._read_range(start, stop, counter):
                yield self._as_batch(sample, valid and sample is not None, worker, corrupt.count)

    def _as_batch(self, s: dict | None, valid: bool, worker: int, corrupt: int) -> dict:
        if s is None:  # a corrupt sample still occupies its slot, so every rank runs the same forwards
            s = {"input": np.zeros((8, 8, 3), np.uint8), "weather": 0, "__key__": ""}
        batch = {f: _to_tensor(s[f])[None] for f in IMAGE_FIELDS if f in s}
        batch["weather"] = torch.tensor([s["weather"]], dtype=torch.long)
        batch["key"] = [s["__key__"]]
        meta = s.get("meta")
        batch["origin"] = [str(meta.get("origin") or "") if isinstance(meta, dict) else ""]  # the photo it came from
        batch["valid"] = torch.tensor([valid])
        batch["__worker__"], batch["__corrupt__"] = worker, corrupt
        return batch


class EvalLoader:
    def __init__(self, stream: EvalStream, num_workers: int):
        self.stream = stream
        self.loader = _loader(stream, num_workers)
        self.tally = _CorruptTally()

    def __len__(self) -> int:
        return len(self.stream)

    @property
    def corrupt(self) -> int:
        return self.tally.total

    def __iter__(self):
        self.tally = _CorruptTally()
        for batch in self.loader:
            self.tally.update(batch)
            yield batch


def eval_loader(path, split: str, weathers, rank: int, world_size: int, num_workers: int,
                max_samples: int = 0) -> EvalLoader:
    shard_set = open_set(path, split)
    stream = EvalStream(shard_set, split, weathers, rank, world_size, num_workers, max_samples)
    return EvalLoader(stream, num_workers)
