"""`weatherkd cache-teacher`: the teacher's outputs cached once, over 2 processes, bound to that teacher."""

import json
import re

import numpy as np
import pytest
import torch

from conftest import accelerate_launch, make_set
from weatherkd import config as cfgmod
from weatherkd import models
from weatherkd.data import stream
from weatherkd.data.check import iter_tar
from weatherkd.data.samples import decode_image
from weatherkd.data.shards import open_set
from weatherkd.errors import UserError
from weatherkd.recipes import distill
from weatherkd.jobs import teacher_cache
from weatherkd.jobs.runner import teacher_hash


@pytest.fixture(scope="module")
def local_teacher(tmp_path_factory):
    """A teacher whose receptive field is known: three 3x3 convs reach 3 pixels."""
    torch.manual_seed(0)
    net = models.build("residual_cnn", width=8, depth=3)
    torch.nn.init.normal_(net.body[-1].weight, 0, 0.05)
    return models.save(net, tmp_path_factory.mktemp("t") / "teacher")


def cache_teacher(out, teacher, shards, nproc=2):
    return accelerate_launch(["weatherkd", "cache-teacher", "--config", "configs/cache-teacher/demo.yaml", f"out_dir={out}",
                              f"teacher={teacher}", f"shards={shards}", "batch_size=5"], nproc=nproc, module=True)


def test_two_processes_cache_whole_image_outputs_that_training_crops_share(builtin_set, local_teacher, tmp_path):
    out = tmp_path / "taught"
    cache_teacher(out, local_teacher, builtin_set)
    source, taught = open_set(builtin_set, "train"), open_set(out, "train")
    manifest = taught.manifest
    assert manifest["created_by"]["teacher_sha256"] == teacher_hash(local_teacher)
    assert manifest["has_target"] == {"train": True} and taught.weathers == source.weathers
    assert taught.count("train") == source.count("train") and len(taught.shards("train")) == len(source.shards("train"))
    tasks = sorted(p.name for p in (out / "tasks").iterdir())
    assert tasks == ["task-0-of-2.json", "task-1-of-2.json"]  # both ranks wrote their own shards

    # Every sample kept as it was, plus the teacher's output on the whole input.
    model = models.load(local_teacher).eval()
    src = {raw["__key__"]: raw for s in source.shards("train") for raw in iter_tar(source.dir / s["file"])}
    seen = 0
    for s in taught.shards("train"):
        for raw in iter_tar(taught.dir / s["file"]):
            original = src[raw["__key__"]]
            assert all(raw[k] == original[k] for k in ("input.png", "target.png", "weather.cls", "meta.json"))
            x = torch.from_numpy(decode_image(raw["input.png"])).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                expected = model(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
            cached = decode_image(raw["teacher.png"]).astype(np.float32) / 255
            assert np.abs(cached - expected).max() <= 0.5 / 255 + 1e-6  # uint8 rounding only
            assert json.loads(raw["prov.json"])["teacher"] == teacher_hash(local_teacher)[:16]
            seen += 1
    assert seen == source.count("train")

    # A training crop of the cache is the teacher on that crop, inside the receptive-field margin.
    # (Without flips: this random teacher is not mirror-symmetric, so a flipped crop of its output
    # is not its output on the flipped crop. A trained restorer nearly is; flips stay on in training.)
    spec = stream.TrainSpec(crop=24, batch_size=4, shuffle_buffer=8, flip=False)
    raw = next(iter(stream.train_loader(out, "train", None, spec, 0, 0, 1, 1, 0).epoch(0)))
    assert raw["input"].dtype == raw["teacher"].dtype == torch.uint8  # uint8 until the device
    batch = stream.to_device(raw, "cpu")
    with torch.no_grad():
        online = model(batch["input"].float()).clamp(0, 1)
    margin = 3
    inner = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin))
    assert (batch["teacher"].float() - online)[inner].abs().max() <= 0.5 / 255 + 1e-6
    assert (batch["teacher"].float() - online).abs().max() > 1 / 255  # at the edge the cache saw real context

    # Rerun: nothing left to write.
    again = cache_teacher(out, local_teacher, builtin_set)
    assert re.search(r"task 0/2: 0 of its \d+ shards to write", again.stderr), again.stderr[-2000:]
    # ...and a rerun into the same folder with another teacher is refused: its shards would mix.
    other = models.save(models.build("residual_cnn", width=4, depth=3), tmp_path / "other")
    mixed = accelerate_launch(["weatherkd", "cache-teacher", "--config", "configs/cache-teacher/demo.yaml", f"out_dir={out}",
                               f"teacher={other}", f"shards={builtin_set}"], nproc=1, module=True, check=False)
    assert mixed.returncode == 1 and "holds shards made with another teacher" in mixed.stderr


def test_a_qoi_set_is_taught_in_qoi_and_another_teachers_cache_is_refused(local_teacher, tmp_path):
    source, out = tmp_path / "qoi", tmp_path / "taught"
    make_set(source, {("train", "snow"): 5, ("train", "raindrop"): 4}, size=16, encoding="qoi")
    # In process, one task: the launch over 2 processes is the test above.
    teacher_cache.TeacherCache(cfgmod.load(teacher_cache.Config, "configs/cache-teacher/demo.yaml",
                                  [f"out_dir={out}", f"teacher={local_teacher}", f"shards={source}",
                                   "slice.index=0", "slice.count=1"])).run()
    taught = open_set(out, "train")
    assert taught.encoding == "qoi" and taught.count("train") == 9
    raws = [raw for s in taught.shards("train") for raw in iter_tar(taught.dir / s["file"])]
    assert all({"input.qoi", "target.qoi", "teacher.qoi"} <= set(r) and not any(".png" in k for k in r) for r in raws)

    other = models.save(models.build("residual_cnn", width=4, depth=3), tmp_path / "other")
    cfg = cfgmod.load(distill.Config, "configs/distill/demo.yaml",
                      ["objective=kd", f"teacher={other}", f"data.train_shards={out}"])
    with pytest.raises(UserError, match="holds the outputs of another teacher"):
        distill.DistillRecipe(cfg)
    cfg = cfgmod.load(distill.Config, "configs/distill/demo.yaml",
                      ["objective=kd", f"teacher={local_teacher}", f"data.train_shards={out}"])
    recipe = distill.DistillRecipe(cfg)
    assert recipe.cached_teacher and "teacher" not in recipe.frozen  # the teacher is not even loaded
