"""`weatherkd shards ...`: glue from parsed arguments to the data modules."""

from __future__ import annotations

import json
import sys

from weatherkd.logs import get_logger

log = get_logger(__name__)


def run_cli(args) -> int:
    return {"synth": _synth, "heldout": _heldout, "ingest": _ingest, "inspect": _inspect, "leakage": _leakage}[args.shards_cmd](args)


def _synth(args) -> int:
    from weatherkd.data.photo_set import SynthSpec, build

    spec = SynthSpec(seed=args.seed, encoding=args.encoding)
    for name in ("weathers", "train", "test", "size", "test_size", "shard_size", "severity", "zoom", "clean_fraction",
                 "grey_fraction", "structure_fraction", "texture_fraction"):
        value = getattr(args, name)
        if value is not None:
            setattr(spec, name, value)
    manifest = build(args.out, args.source, spec, overwrite=args.overwrite, skip_bad=args.skip_bad)
    bad = manifest["created_by"].get("skipped_bad", [])
    log.info("wrote %s: %s%s", args.out, json.dumps(manifest["splits"]),
             f" (skipped {len(bad)} unreadable images)" if bad else "")
    return 0


def _heldout(args) -> int:
    from weatherkd.data.heldout import HeldoutSpec, build

    spec = HeldoutSpec(seed=args.seed)
    for name in ("levels", "views", "size"):
        value = getattr(args, name)
        if value is not None:
            setattr(spec, name, value)
    manifest = build(args.out, args.source, spec, overwrite=args.overwrite)
    log.info("wrote %s: %s", args.out, json.dumps(manifest["splits"]))
    return 0


def _ingest(args) -> int:
    from weatherkd.data.ingest import ingest

    manifest = ingest(args.layout, args.root, args.out, split=args.split, list_file=args.list_file,
                      target_root=args.target_root, weather=args.weather, skip_missing=args.skip_missing,
                      skip_bad=args.skip_bad, shard_size=args.shard_size or 256, overwrite=args.overwrite,
                      encoding=args.encoding)
    created = manifest["created_by"]
    log.info("wrote %s: %s (skipped %d pairs with a missing file, %d with an unreadable image)", args.out,
             json.dumps(manifest["splits"]), created.get("skipped_missing", 0), len(created.get("skipped_bad", [])))
    return 0


def _inspect(args) -> int:
    from weatherkd.data.check import inspect

    report, problems = inspect(args.dir)
    print(json.dumps(report, indent=2))
    for p in problems:
        print(f"CORRUPT {p}", file=sys.stderr)
    return 1 if problems else 0


def _leakage(args) -> int:
    from weatherkd.data.check import leakage

    kwargs = {} if args.max_distance is None else {"max_distance": args.max_distance}
    pairs = leakage(args.train, args.test, **kwargs)
    print(json.dumps({"leaks": len(pairs), "pairs": pairs}, indent=2))
    if pairs:
        print(f"LEAKAGE: {len(pairs)} near-duplicate pairs between {args.train} and {args.test}", file=sys.stderr)
    return 1 if pairs else 0
