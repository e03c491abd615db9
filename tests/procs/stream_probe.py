"""Runs under `accelerate launch`: records what each rank's loaders yield, one JSON file per rank."""

import json
import sys
from pathlib import Path

from accelerate import PartialState

from weatherkd.data.stream import TrainSpec, eval_loader, train_loader


def main():
    mode, out, *dirs = sys.argv[1:]
    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    report = {}
    for d in dirs:
        if mode == "eval":
            loader = eval_loader(d, "test", None, rank, world, num_workers=2)
            batches = list(loader)
            report[d] = {
                "len": len(loader),
                "batches": len(batches),
                "valid_keys": [k for b in batches for k, v in zip(b["key"], b["valid"].tolist()) if v],
                "corrupt": loader.corrupt,
            }
        else:
            spec = TrainSpec(crop=8, batch_size=4, shuffle_buffer=8)
            loader = train_loader(d, "train", None, spec, seed=1, rank=rank, world_size=world,
                                  batches_per_epoch=7, num_workers=2)
            epochs = [[b["key"] for b in loader.epoch(e)] for e in range(3)]
            replay = [b["key"] for b in loader.epoch(0, skip=3)]
            # One set of workers across epochs, as the engine runs it: 7 batches per epoch over 2
            # workers hand the first batch of epoch 1 to worker 1.
            stream = loader.from_position(0, skip=3)
            continuous = [next(stream)["key"] for _ in range(4 + 7 + 2)]
            report[d] = {"epochs": epochs, "replay_from_3": replay, "continuous_from_3": continuous,
                         "corrupt": loader.corrupt,
                         "shapes": list(next(iter(loader.epoch(0)))["input"].shape)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    state.wait_for_everyone()


if __name__ == "__main__":  # loader workers re-import __main__ (forkserver)
    main()
