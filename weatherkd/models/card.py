"""The model card: ``README.md`` in every exported model folder, for the person who opens it.

Written at export (``Engine.export``, ``weatherkd prune``) right after ``models.save``, from the
folder itself (``model.json``, the weights) and the run's resolved config: what the model is, how
it was made, how to use it, and the licences of the code and the data. ``weatherkd eval`` adds
its table (``add_evaluation``): one section per shard set, split and protocol, replaced when the
same evaluation runs again. ``weatherkd export`` copies the card beside the ONNX file with the
export's own record (``export_copy``).

The layout is the YAML front matter that model hubs read (``library_name``, ``tags``,
``license``, ``metrics``, ``datasets``, ``model-index``); nothing here uploads it. Eval rewrites the
card after export, so it must stay out of any hash or manifest of the model's files.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import yaml

from weatherkd.io import atomic_write_text, sha256_file
from weatherkd.logs import get_logger

log = get_logger(__name__)

CARD = "README.md"
CODE_LICENSE = "apache-2.0"
FLOPS_SIZE = 256
_EVAL_SECTION = "## Evaluation"
NOT_EVALUATED = "Not evaluated yet: `weatherkd eval` adds its table here."
_BLOCK = re.compile(r"<!-- weatherkd-eval (?P<key>\{.*?\}) -->\n(?P<body>.*?)<!-- /weatherkd-eval -->\n", re.S)

# What each kind of run optimised, where model.json does not say (distill records its objective).
_OBJECTIVES = {
    "teacher": "supervised restoration on paired data, guided by CLIP weather features (the `loss` section "
               "of the config below)",
    "vq": "VQ autoencoder reconstruction of clean images (the codebook DCKD distils through)",
    "adapter": "degradation-prompt adapter: CLIP image features to weather prompts (D4IR)",
    "prune": "structured pruning of a trained network to a FLOPs target (no training; distil it afterwards)",
}
_USES = {
    "vq": "It is not an image restorer: DCKD distillation reads it (`vq=DIR` in a distill config).",
    "prompt_adapter": "It is not an image restorer: `weatherkd synth` reads it (`adapter=DIR`).",
    "prompt_adapter_head": "It is not an image restorer: `weatherkd synth` reads it (`adapter=DIR`).",
}


def path(model_dir) -> Path:
    return Path(model_dir) / CARD


def split_front_matter(text: str) -> tuple[dict, str]:
    """(front matter as a dict, the markdown below it); ({}, text) when there is none."""
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 4)
    if end < 0:
        return {}, text
    return yaml.safe_load(text[4:end]) or {}, text[end + 5:]


def join_front_matter(meta: dict, body: str) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n" + body


def _sha(path_: Path) -> str | None:
    return sha256_file(path_) if path_.is_file() else None


def _cost(model_dir: Path) -> dict:
    """Parameters, GFLOPs at 256², whether it maps an image to an image: measured on the CPU, from the files."""
    import torch

    from weatherkd import cost, models

    model = models.load(model_dir).eval()
    arch = model.weatherkd_spec["arch"]
    out = {"params": cost.params(model), "gflops": None, "restorer": arch not in _USES}
    try:
        models.check_restores_images(model, model_dir)
    except Exception:  # noqa: BLE001 - the prompt adapter: not image to image
        out["restorer"] = False
    try:
        with torch.no_grad():
            out["gflops"] = cost.flops(model, FLOPS_SIZE) / 1e9
    except Exception as e:  # noqa: BLE001 - a model that takes no 256² image; the card says so
        log.debug("no FLOPs for %s: %s", model_dir, e)
    return out


def _run_config(model_dir: Path) -> dict | None:
    config = model_dir.parent / "config.yaml"
    return yaml.safe_load(config.read_text()) if config.is_file() else None


def _shard_source(shards: str | None, depth: int = 0) -> dict | None:
    """A shard set's manifest hash, what made it, and its data's licence, as far as its manifest says."""
    if not shards:
        return None
    manifest_file = Path(shards) / "manifest.json"
    if not manifest_file.is_file():
        return {"path": str(shards), "manifest_sha256": None, "licence": "unknown: the set is not here any more "
                "(or is a list of tars), so its manifest could not be read at export"}
    manifest = json.loads(manifest_file.read_text())
    created = manifest.get("created_by", {})
    return {"path": str(Path(shards).resolve()), "name": Path(shards).resolve().name,
            "manifest_sha256": sha256_file(manifest_file), "splits": manifest.get("splits"),
            "source": _describe_source(created), "licence": _data_licence(created, depth)}


def _describe_source(created: dict) -> str:
    if "layout" in created:
        return f"`weatherkd shards ingest --layout {created['layout']}` from `{created.get('root')}`"
    if created.get("generator") == "weatherkd.data.heldout":
        return f"`weatherkd shards heldout` (source {created.get('source')}, photos: {', '.join(created.get('photos', []))})"
    if "stage" in created:
        return f"`weatherkd {created['stage']}` (a distillation set made from a teacher)"
    if "source" in created:
        train, test = created.get("train_photos"), created.get("test_photos")
        return f"`weatherkd shards synth --source {created['source']}`" + (
            f" (training photos: {', '.join(train)}; test photos: {', '.join(test)})" if train and test else "")
    return "not recorded in its manifest"


def _data_licence(created: dict, depth: int) -> str:
    source = created.get("source")
    if source in ("builtin", "builtin-other"):
        return _photo_licences([*created.get("train_photos", []), *created.get("test_photos", []),
                                *created.get("photos", [])])
    if "layout" in created:
        return (f"the data set ingested from `{created.get('root')}` keeps its own licence (AllWeather's parts, "
                "Outdoor-Rain, Snow100K and RainDrop, each have their own terms); record it here")
    if "stage" in created:
        config = created.get("config") or {}
        parent = config.get("shards") or config.get("clean")
        made = (f"images made by `weatherkd {created['stage']}` from the teacher"
                + (" (no training image was read)" if created["stage"] == "dream" else ""))
        if parent and depth < 2:
            inner = _shard_source(parent, depth + 1)
            return made + f", from the set `{parent}`, whose licence is: {inner['licence']}"
        return made
    if source:
        return f"your own photos from `{source}`: their licence is theirs; record it here"
    return "not recorded in the set's manifest"


def _photo_licences(names: list[str]) -> str:
    """The embedded photos keep their own licences: which ones, and where each photo's is recorded."""
    try:
        from weatherkd.data.photo_set import PHOTO_RECORD, builtin_catalogue

        catalogue, record = builtin_catalogue(), f"weatherkd/data/photos/PHOTOS.md` and `{PHOTO_RECORD.name}"
    except ImportError:  # a checkout before the shipped photos: scikit-image's
        catalogue, record = {}, None
    by_licence: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        licence = catalogue[name]["license"] if name in catalogue else "scikit-image's (see its docstring)"
        by_licence.setdefault(licence, []).append(name)
    listed = "; ".join(f"{lic}: {', '.join(ns)}" for lic, ns in sorted(by_licence.items()))
    where = (f"each photo's author, source, licence and changes are in `{record}`; the photos' terms "
             "(attribution, share-alike) apply to the shard sets made from them" if record else "")
    skimage = ("photos from scikit-image (`skimage.data`) state theirs in their docstrings, e.g. "
               "`python -c 'import skimage.data; help(skimage.data.astronaut)'`"
               if any(n not in catalogue for n in dict.fromkeys(names)) else "")
    return ("the photographs embedded in weatherkd keep their own licences"
            + (f" ({listed})" if listed else "") + "; " + "; ".join(p for p in (where, skimage) if p)
            + ". The weather drawn over them is generated by weatherkd (Apache-2.0)")


def _made_from(spec: dict, config: dict | None) -> dict:
    """The models this one was made from (teacher, initialisation, pruned network) with their weights' hashes."""
    config = config or {}
    out = {}
    for what, value in (("teacher", spec.get("teacher") or config.get("teacher")),
                        ("initialised from", spec.get("init") or config.get("init")),
                        ("pruned from", spec.get("pruned_from") or config.get("network"))):
        if value:
            out[what] = {"path": str(value), "weights_sha256": _sha(Path(value) / "model.safetensors")}
    return out


def render(model_dir, stage: str | None = None, config: dict | None = None) -> str:
    """The card for ``model_dir`` without evaluations. ``config``: the run's resolved config
    (default: ``config.yaml`` beside the model folder, where training stages save it)."""
    from weatherkd.models.registry import SPEC, WEIGHTS, read_spec

    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    config = config if config is not None else _run_config(model_dir)
    cost = _cost(model_dir)
    arch, kwargs = spec["arch"], spec.get("kwargs", {})
    base = kwargs.get("base", {}) if arch == "pruned" else {}
    size = kwargs.get("size") or (base.get("kwargs", {}).get("size") if base else None)
    name = model_dir.resolve().parent.name
    objective = spec.get("objective") or (config or {}).get("objective") or _OBJECTIVES.get(stage or "")
    data = (config or {}).get("data", {}) if isinstance((config or {}).get("data"), dict) else {}
    train_set = _shard_source(data.get("train_shards") or (config or {}).get("calib_shards"))
    eval_set = data.get("eval_shards")
    made_from = _made_from(spec, config)
    data_label = "calibration data" if stage == "prune" else "training data"
    random_init = bool(spec.get("random_init"))
    weathers = spec.get("weathers") or data.get("weathers") or []

    meta = {
        "library_name": "weatherkd",
        "pipeline_tag": "image-to-image" if cost["restorer"] else None,
        "license": CODE_LICENSE,
        "tags": [t for t in ("weatherkd", "image-restoration", "adverse-weather", *(w.replace("_", "-") for w in weathers),
                             stage, objective if spec.get("objective") else None, arch,
                             "knowledge-distillation" if spec.get("teacher") else None,
                             "random-init" if random_init else None) if t],
        "metrics": ["psnr", "ssim"],
        "datasets": [train_set["name"]] if train_set and train_set.get("name") else [],
    }
    meta = {k: v for k, v in meta.items() if v is not None}

    lines = [f"# {name}", ""]
    what = "an image restorer (a degraded RGB image in, the restored image out, same size)" if cost["restorer"] \
        else "a helper model, not an image restorer"
    lines.append(f"`{arch}`" + (f" ({size})" if size else "") + f", {what}, made by `weatherkd {stage}`."
                 if stage else f"`{arch}`" + (f" ({size})" if size else "") + f", {what}.")
    if weathers:
        lines.append(f"Weathers: {', '.join(weathers)}.")
    if random_init:
        lines += ["", "> **Built with random pretrained towers** (`allow_random_init`): a pipeline check, not a "
                      "result. Its figures say nothing about the method."]
    lines += ["", "## Model", "", "| | |", "|---|---|", f"| arch | `{arch}` |"]
    if size:
        lines.append(f"| size | {size} |")
    lines.append(f"| kwargs | `{json.dumps(kwargs, sort_keys=True)[:400]}` |")
    lines.append(f"| parameters | {cost['params']:,} ({cost['params'] / 1e6:.3f} M) |")
    lines.append(f"| GFLOPs@{FLOPS_SIZE} | " + (f"{cost['gflops']:.3f}" if cost["gflops"] is not None else "—") + " |")
    lines.append(f"| weights | `{WEIGHTS}`, sha256 `{_sha(model_dir / WEIGHTS)}` |")
    lines.append(f"| spec | `{SPEC}` |")

    lines += ["", "## How it was made", "", "| | |", "|---|---|"]
    if stage:
        lines.append(f"| stage | `weatherkd {stage}` |")
    if objective:
        lines.append(f"| objective | {objective} |")
    for what_, src in made_from.items():
        lines.append(f"| {what_} | `{src['path']}`, weights sha256 `{src['weights_sha256'] or 'not found'}` |")
    if train_set:
        lines.append(f"| {data_label} | `{train_set['path']}`, manifest sha256 `{train_set['manifest_sha256']}` |")
        lines.append(f"| data made by | {train_set.get('source', '—')} |")
    if eval_set:
        lines.append(f"| validated on | `{eval_set}` |")
    if "step" in spec:
        lines.append(f"| steps | {spec['step']} |")
    if config and isinstance(config.get("train"), dict):
        t = config["train"]
        lines.append(f"| batch, lr, precision | {data.get('batch_size')} per process, {t.get('lr')}, "
                     f"{t.get('mixed_precision')} |")
    if config and "seed" in config:
        lines.append(f"| seed | {config['seed']} |")
    lines.append(f"| pretrained towers | {'**random** (allow_random_init)' if random_init else 'loaded from files'} |")
    lines.append(f"| exported | {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, weatherkd {_version()} |")
    if config:
        lines += ["", "<details><summary>The resolved config</summary>", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=False).rstrip(), "```", "", "</details>"]

    lines += ["", _EVAL_SECTION, "", NOT_EVALUATED, ""]
    lines += ["## Use", ""]
    shown = _shown(model_dir)
    if cost["restorer"]:
        lines += ["```bash",
                  f"weatherkd restore --model {shown} photos/ --out restored/        # your photos, any size",
                  f"weatherkd eval --model {shown} --shards SHARDS [--protocol rgb|y]  # adds its table to this card",
                  f"weatherkd export --model {shown} --format onnx                 # ONNX, parity-checked; copies this card",
                  "```"]
    else:
        lines.append(_USES.get(arch, "It is not an image restorer: another stage reads it."))
    lines += ["", "In Python: `weatherkd.models.load(DIR)` rebuilds it from `model.json` and loads the weights.", ""]

    lines += ["## Licence", "", "- Code: Apache-2.0 (weatherkd); the front matter's `license` is the code's. Whether the "
              "data's licences below bear on these weights is for their user to judge: they are listed, not settled."]
    if train_set:
        lines.append(f"- {data_label.capitalize()} (`{train_set.get('name', train_set['path'])}`): "
                     f"{train_set['licence'].rstrip('.')}.")
    for what_, src in made_from.items():
        lines.append(f"- The {what_} model (`{src['path']}`): its own card says what it was trained on.")
    lines.append("")
    return join_front_matter(meta, "\n".join(lines))


def _shown(p: Path) -> str:
    """A path as the card's commands give it: relative to the current folder when under it."""
    p = p.resolve()
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)


def _version() -> str:
    from weatherkd import __version__

    return __version__


def write(model_dir, stage: str | None = None, config: dict | None = None) -> Path:
    """``model_dir/README.md``, atomically; call it after ``models.save``."""
    out = path(model_dir)
    atomic_write_text(out, render(model_dir, stage, config))
    return out


def write_at_export(model_dir, stage: str, config: dict | None = None) -> Path | None:
    """``write``, where a failure is a warning: the model itself is saved already, and a card
    must not throw away a finished training run."""
    try:
        return write(model_dir, stage, config)
    except Exception as e:  # noqa: BLE001
        log.warning("model card %s not written (%s: %s); the model is complete", path(model_dir), type(e).__name__, e)
        return None


def text(model_dir) -> str:
    """The folder's card, or one rendered now for a folder exported before cards existed."""
    card = path(model_dir)
    return card.read_text() if card.is_file() else render(model_dir)


def _eval_key(summary: dict) -> dict:
    return {"shards": summary.get("shards"), "split": summary.get("split"), "protocol": summary.get("protocol")}


def eval_section(summary: dict, out_dir) -> str:
    from weatherkd.commands.evaluate import markdown

    key = _eval_key(summary)
    name = Path(key["shards"] or "?").name
    table = markdown(summary, "this model").replace("### this model", f"### {name} / {key['split']}", 1)
    return (f"<!-- weatherkd-eval {json.dumps(key, sort_keys=True)} -->\n{table.rstrip()}\n\n"
            f"`{key['shards']}` ({key['split']} split), {summary['n']} samples"
            + (f", tiles of {summary['tile']}" if summary.get("tile") else "")
            + f"; evaluated {time.strftime('%Y-%m-%d')}, full results in `{out_dir}`.\n\n<!-- /weatherkd-eval -->\n")


def add_evaluation(model_dir, summary: dict, out_dir) -> Path:
    """Add (or replace) this evaluation's section and its ``model-index`` entry in the card.
    One section per shard set, split and protocol: re-running an evaluation replaces its own."""
    model_dir = Path(model_dir)
    meta, body = split_front_matter(text(model_dir))
    start = body.find(_EVAL_SECTION + "\n")
    if start < 0:  # a card without the section (edited by hand): it goes at the end
        body = body.rstrip("\n") + f"\n\n{_EVAL_SECTION}\n"
        start = body.find(_EVAL_SECTION + "\n")
    content = start + len(_EVAL_SECTION) + 1
    following = body.find("\n## ", content)
    end = len(body) if following < 0 else following + 1
    blocks = {b["key"]: b.group(0) for b in _BLOCK.finditer(body[content:end])}
    blocks[json.dumps(_eval_key(summary), sort_keys=True)] = eval_section(summary, out_dir)
    body = body[:content] + "\n" + "\n".join(blocks[k] for k in sorted(blocks)) + "\n" + body[end:]
    meta = _with_model_index(meta, model_dir, summary)
    out = path(model_dir)
    atomic_write_text(out, join_front_matter(meta, body))
    return out


def _with_model_index(meta: dict, model_dir: Path, summary: dict) -> dict:
    key = _eval_key(summary)
    name = Path(key["shards"] or "?").name
    result = {
        "task": {"type": "image-to-image", "name": "Adverse-weather image restoration"},
        "dataset": {"name": name, "type": "weatherkd-shards", "split": key["split"]},
        "metrics": [{"type": "psnr", "name": f"mean PSNR ({key['protocol']})", "value": round(summary["mean"]["psnr"], 4)},
                    {"type": "ssim", "name": f"mean SSIM ({key['protocol']})", "value": round(summary["mean"]["ssim"], 4)}],
    }
    if summary.get("clean_in"):
        result["metrics"].append({"type": "psnr", "name": f"clean-in PSNR ({key['protocol']})",
                                  "value": round(summary["clean_in"]["psnr"], 4)})
    index = meta.get("model-index") or [{"name": model_dir.resolve().parent.name, "results": []}]
    results = [r for r in index[0].get("results", [])
               if (r.get("dataset", {}).get("name"), r.get("dataset", {}).get("split"),
                   r.get("metrics", [{}])[0].get("name")) != (name, key["split"], result["metrics"][0]["name"])]
    index[0]["results"] = [*results, result]
    if name not in meta.get("datasets", []):
        meta["datasets"] = [*meta.get("datasets", []), name]
    return {**meta, "model-index": index}


def export_copy(model_dir, out_file, record: dict) -> Path:
    """The card beside an exported file (``FILE.onnx`` -> ``FILE.onnx.md``), with the export's record."""
    out_file = Path(out_file)
    meta, body = split_front_matter(text(model_dir))
    meta["tags"] = [*meta.get("tags", []), record["format"]]
    check = record["check"]
    lat = record["latency"]
    section = [
        f"## Export: `{out_file.name}`", "",
        f"This card was copied from `{Path(model_dir).resolve()}` when the model was exported. Its evaluations are "
        "the PyTorch model's; the exported graph matches it within the tolerance below.", "",
        "| | |", "|---|---|",
        f"| format | {record['format']}, opset {record['opset']} |",
        f"| file | `{out_file.name}`, sha256 `{record['sha256']}` |",
        f"| input | `image` {record['inputs']['image']}, float32 in [0, 1] |",
        f"| shape | " + (f"fixed {record['fixed_size'][0]}×{record['fixed_size'][1]}" if record.get("fixed_size")
                         else "dynamic batch, height and width") + " |",
        f"| parity | max abs error {max(check['max_abs_error']):.2e} (allowed {check['tolerance']:g}) against PyTorch "
        f"in fp32 on {len(check['sizes'])} real photos ({', '.join('×'.join(map(str, s)) for s in check['sizes'])}); "
        f"onnx.checker {check['onnx_checker']}; {check['runtime']} |",
        *_precision_rows(record),
        f"| latency at {'×'.join(map(str, lat['size']))} | PyTorch eager {lat['torch_eager_ms']:.1f} ms, onnxruntime "
        f"{lat['onnxruntime_ms']:.1f} ms" + (f" (its fp32 graph {lat['onnxruntime_fp32_ms']:.1f} ms)"
                                              if "onnxruntime_fp32_ms" in lat else "") + " (this machine, at export) |",
        f"| tiling | tiles of {record['tile']}, overlap {record['tile_overlap']} |",
        f"| record | `{out_file.name}.json` |", "",
        "```bash", f"weatherkd restore --model {out_file} photos/ --out restored/", "```", "",
    ]
    body = body.replace("\n## Use\n", "\n" + "\n".join(section) + "\n## Use\n", 1) if "\n## Use\n" in body \
        else body.rstrip("\n") + "\n\n" + "\n".join(section)
    dest = card_beside(out_file)
    atomic_write_text(dest, join_front_matter(meta, body))
    return dest


def _precision_rows(record: dict) -> list[str]:
    """The int8 graph's quality, or the fp16 graph's parity, against the fp32 graph checked above."""
    if "quality" in record:
        q, ops = record["quality"], record["quantization"]["ops"]
        return [f"| precision | int8 ({record['quantization']['format']}, calibrated on "
                f"{record['quantization']['calibration']['samples']} samples); in int8: "
                f"{', '.join(f'{k} ×{v}' for k, v in ops['int8'].items())}; in float: "
                f"{', '.join(f'{k} ×{v}' for k, v in ops['float'].items())} |",
                f"| quality | {q['psnr_int8_db']:.2f} dB against {q['reference']} ({q['drop_db']:+.3f} dB below fp32's "
                f"{q['psnr_fp32_db']:.2f}; allowed {q['max_drop_db']:g}) on {q['samples']} {q['split']} samples; "
                f"{min(q['psnr_int8_vs_fp32_photos_db']):.1f} dB or more against fp32 on the photos |"]
    if "fp16" in record:
        f = record["fp16"]
        return [f"| precision | fp16: max abs error {max(f['max_abs_error_vs_fp32']):.2e} against fp32 (allowed "
                f"{f['tolerance']:g}), {min(f['psnr_vs_fp32_photos_db']):.1f} dB or more on the photos |"]
    return []


def card_beside(out_file) -> Path:
    out_file = Path(out_file)
    return out_file.with_name(out_file.name + ".md")
