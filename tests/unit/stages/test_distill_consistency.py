"""The consistency term (the official DCKD recipe's ``cri_lcr``): exact transforms, the term's
value, the teacher it needs from a cached set, and a few real engine steps with it, in process."""

import itertools
import json
import signal

import pytest
import torch
import torch.nn.functional as F

from conftest import make_set
from weatherkd import config as C
from weatherkd import models
from weatherkd.losses import distill as D
from weatherkd.recipes import distill
from weatherkd.jobs import teacher_cache

ALL_COMBINATIONS = torch.tensor(list(itertools.product([False, True], repeat=4)))  # (16, 4)


def reference(x: torch.Tensor, ops: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The official ``noising``, one sample at a time: invert, flip dim −2, flip dim −1, transpose
    (and back in reverse order)."""
    fns = [lambda s: 1 - s, lambda s: s.flip(-2), lambda s: s.flip(-1), lambda s: s.transpose(-2, -1)]
    out = []
    for sample, chosen in zip(x, ops):
        for i in (reversed(range(4)) if inverse else range(4)):
            sample = fns[i](sample) if chosen[i] else sample
        out.append(sample)
    return torch.stack(out)


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_combination_of_the_four_ops_is_undone_exactly_per_sample(channels_last):
    torch.manual_seed(0)
    # Values k/256: 1 − x is exact in fp32 there, so the round trip must be bit-exact; the
    # geometric ops are exact for any value.
    x = torch.randint(0, 257, (16, 3, 8, 8)).float() / 256
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ops = ALL_COMBINATIONS  # sample i gets combination i
    y = D.transform(x, ops)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(y, reference(x, ops))  # the official order, sample by sample
    assert torch.equal(D.untransform(y, ops), x)
    assert torch.equal(y[0], x[0]) and all(not torch.equal(y[i], x[i]) for i in range(1, 16))
    # order matters where it should: flip then transpose is not transpose then flip
    assert not torch.equal(D.transform(x[:1], torch.tensor([[False, True, False, True]])),
                           x[:1].transpose(-2, -1).flip(-2))
    # any float (torch.rand's own are multiples of 2⁻²⁴, so cubed): only the inversion rounds, by
    # at most 2⁻²⁴ (half an ulp of the values in [0.5, 1) that 1 − x is rounded to, 2⁻²⁵)
    z = torch.rand(16, 3, 8, 8) ** 3
    assert (D.untransform(D.transform(z, ops), ops) - z).abs().max() <= 2.0 ** -24
    geometric = ops & torch.tensor([False, True, True, True])
    assert torch.equal(D.untransform(D.transform(z, geometric), geometric), z)
    with pytest.raises(ValueError, match="square"):
        D.transform(torch.rand(2, 3, 8, 6), ops[:2])


def test_ops_are_drawn_per_sample_and_op_with_the_probability():
    g = torch.Generator().manual_seed(0)
    ops = D.consistency_ops(20000, 0.5, g)
    assert ops.shape == (20000, 4) and ops.dtype == torch.bool
    assert torch.allclose(ops.float().mean(0), torch.full((4,), 0.5), atol=0.02)
    assert len({tuple(r) for r in ops.tolist()}) == 16  # independent: every combination occurs
    assert not D.consistency_ops(64, 0.0, g).any() and D.consistency_ops(64, 1.0, g).all()


def test_ops_left_out_are_never_drawn_and_the_others_draw_as_before():
    every = D.consistency_ops(512, 0.5, torch.Generator().manual_seed(3))
    flips = D.consistency_ops(512, 0.5, torch.Generator().manual_seed(3), ["flip_rows", "flip_columns"])
    assert not flips[:, [0, 3]].any()  # invert, transpose
    assert torch.equal(flips[:, 1:3], every[:, 1:3])  # the same draws: runs differ only in the ops left out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("consistency")
    torch.manual_seed(0)
    identity = models.build("residual_cnn", width=4, depth=3)
    torch.nn.init.zeros_(identity.body[-1].weight)
    torch.nn.init.zeros_(identity.body[-1].bias)  # x − 0: equivariant to all four ops
    net = models.build("residual_cnn", width=8, depth=3)
    torch.nn.init.normal_(net.body[-1].weight, 0, 0.2)  # a random restorer: equivariant to none of them
    return models.save(identity, root / "identity"), models.save(net, root / "random")


def recipe_for(teacher, *overrides):
    cfg = C.load(distill.Config, "configs/distill/demo.yaml",
                 ["objective=kd", f"teacher={teacher}", "consistency.objectives=[kd]", *overrides])
    recipe = distill.DistillRecipe(cfg)
    for module in recipe.frozen.values():
        module.requires_grad_(False).eval()
    return recipe


def test_the_term_is_zero_for_a_student_equal_to_an_equivariant_teacher_and_positive_otherwise(teachers):
    identity, random_teacher = teachers
    x = torch.randint(0, 257, (8, 3, 16, 16)).float() / 256  # k/256: inversion exact, so the term is 0 exactly
    for prob in ("0.5", "1.0"):
        recipe = recipe_for(identity, f"consistency.prob={prob}")
        assert recipe.consistency_term(x, x.clone()).item() == 0.0
        assert recipe.consistency_term(x, (x + 0.01).clamp(0, 1)).item() > 0
    # A teacher that is not equivariant: a student equal to it has no kd loss left, but a
    # consistency loss wherever an op was drawn, and none at probability 0.
    recipe = recipe_for(random_teacher, "consistency.prob=1.0", "consistency.weight=2.0")
    with torch.no_grad():
        t = recipe.frozen["teacher"](x).clamp(0, 1)
        assert (reference(recipe.frozen["teacher"](reference(x, ALL_COMBINATIONS[[-1] * 8])).clamp(0, 1),
                          ALL_COMBINATIONS[[-1] * 8], inverse=True) - t).abs().max() > 0.01
    assert recipe.consistency_term(x, t).item() > 0
    assert recipe_for(random_teacher, "consistency.prob=0.0").consistency_term(x, t).item() == 0.0
    # The target is the reference, per sample with the ops drawn from the recipe's generator.
    recipe = recipe_for(random_teacher, "consistency.weight=2.0")
    out = torch.rand(8, 3, 16, 16, requires_grad=True)
    recipe.generator.manual_seed(7)
    ops = D.consistency_ops(8, 0.5, recipe.generator)
    assert 0 < ops.sum() < 32
    with torch.no_grad():
        want = reference(recipe.frozen["teacher"](reference(x, ops)).clamp(0, 1), ops, inverse=True)
    recipe.generator.manual_seed(7)
    term = recipe.consistency_term(x, out)
    assert term.item() == pytest.approx(2.0 * F.l1_loss(out, want).item(), rel=1e-6)
    term.backward()
    assert out.grad is not None and all(p.grad is None for p in recipe.frozen["teacher"].parameters())


def test_step_names_the_term_and_only_listed_objectives_use_it(teachers):
    identity, random_teacher = teachers
    x = torch.rand(2, 3, 16, 16)
    recipe = recipe_for(random_teacher)
    losses = recipe.step(recipe.model, {"input": x}, step=0)
    assert {"kd", "consistency", "loss"} == set(losses)
    assert losses["loss"].item() == pytest.approx(losses["kd"].item() + losses["consistency"].item())
    plain = recipe_for(random_teacher, "consistency.objectives=[dckd]")  # a kd run of a config made for dckd
    assert "consistency" not in plain.step(plain.model, {"input": x}, step=0)
    with pytest.raises(C.ConfigError, match="must be one of 'kd', 'dckd'"):
        C.load(distill.Config, "configs/distill/demo.yaml", ["consistency.objectives=[scratch]"])
    for bad, message in (("consistency.prob=1.5", "between 0 and 1"), ("consistency.weight=0", "must be > 0")):
        with pytest.raises(C.ConfigError, match=message):
            C.load(distill.Config, "configs/distill/demo.yaml", ["consistency.objectives=[kd]", bad])


def test_configs_default_off_demo_off_allweather_dckd_on_with_the_official_values():
    for name in ("demo", "demo-dream", "demo-pruned", "allweather-dream", "allweather-pruned"):
        cfg = C.load(distill.Config, f"configs/distill/{name}.yaml")
        assert cfg.consistency.objectives == [] and not cfg.uses_consistency, name
    for name in ("allweather", "allweather-student-medium"):
        cfg = C.load(distill.Config, f"configs/distill/{name}.yaml")
        assert (cfg.objective, cfg.consistency.objectives) == ("dckd", ["dckd"])
        assert (cfg.consistency.prob, cfg.consistency.weight) == (0.5, 1.0)  # train.noisy.prob, lcr_opt.loss_weight
        # the pipeline's other runs of the same config: kd stays plain kd, scratch has no teacher
        for objective in ("kd", "scratch"):
            other = C.load(distill.Config, f"configs/distill/{name}.yaml", [f"objective={objective}"])
            assert not other.uses_consistency


@pytest.fixture(scope="module")
def sets(teachers, tmp_path_factory):
    """A paired set, its test split, and the same set taught by the random teacher (in process)."""
    _, random_teacher = teachers
    root = tmp_path_factory.mktemp("sets")
    make_set(root / "paired", {("train", "snow"): 6, ("train", "raindrop"): 6, ("test", "snow"): 2}, size=24)
    teacher_cache.TeacherCache(C.load(teacher_cache.Config, "configs/cache-teacher/demo.yaml", [
        f"out_dir={root / 'taught'}", f"teacher={random_teacher}", f"shards={root / 'paired'}",
        "slice.index=0", "slice.count=1"])).run()
    return root / "paired", root / "taught"


def test_from_a_cached_set_consistency_loads_the_teacher_and_plan_counts_it(teachers, sets):
    from weatherkd.commands.plan import planned_models

    _, random_teacher = teachers
    paired, taught = sets
    for objectives, held in (("[]", False), ("[kd]", True)):
        cfg = C.load(distill.Config, "configs/distill/demo.yaml", [
            "objective=kd", f"teacher={random_teacher}", f"data.train_shards={taught}",
            f"consistency.objectives={objectives}"])
        recipe = distill.DistillRecipe(cfg)
        assert recipe.cached_teacher and ("teacher" in recipe.frozen) == held
        planned = planned_models("distill", cfg)
        assert ("teacher" in planned.held) == held
        assert any("caches the teacher's outputs" in n for n in planned.notes)
        if held:  # the kd term still reads the cache; only the consistency term runs the teacher
            x, cached = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
            assert torch.equal(recipe.teacher_output({"input": x, "teacher": cached}), cached)
    online = C.load(distill.Config, "configs/distill/demo.yaml", ["objective=kd", f"teacher={random_teacher}",
                                                                   f"data.train_shards={paired}"])
    assert "teacher" in planned_models("distill", online).held  # not cached: counted, as before


@pytest.mark.parametrize("objective,cached", [("kd", False), ("dckd", True)])
def test_a_few_engine_steps_with_consistency_log_it_under_its_own_name(teachers, sets, tmp_path, objective, cached):
    from weatherkd.engine import Engine

    _, random_teacher = teachers
    paired, taught = sets
    torch.manual_seed(0)
    vq = models.save(models.build("vq", widths=(8, 16, 32), codes=32, code_dim=8), tmp_path / "vq")
    out = tmp_path / "run"
    cfg = C.load(distill.Config, "configs/distill/demo.yaml", [
        f"objective={objective}", f"teacher={random_teacher}", f"vq={vq}", f"out_dir={out}",
        f"data.train_shards={taught if cached else paired}", f"data.eval_shards={paired}",
        f"consistency.objectives=[{objective}]", "data.crop=16", "data.batch_size=4", "data.num_workers=0",
        "train.max_steps=3", "train.log_every=1", "train.eval_every=0", "ckpt.every=3", "tracker.kind=none",
        "history.every=[1]", "history.milestones=[]"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}  # the engine's preemption
    try:
        engine = Engine(cfg, distill.RECIPE, "distill")
        engine.fit()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert engine.recipe.cached_teacher == cached and "teacher" in engine.recipe.frozen
    logged = json.loads((out / "progress.json").read_text())  # the last log line's scalars
    assert logged["step"] == 3 and logged["train/consistency"] > 0
    assert logged["train/loss"] > logged["train/consistency"] + logged["train/kd"] - 1e-6
    if objective == "dckd":
        assert {"train/contrast", "train/dmm"} <= set(logged)
    spec = json.loads((out / "model" / "model.json").read_text())
    assert spec["consistency"] is True and spec["teacher_cached"] == cached
