"""Students, the VQ model, DCKD's terms and the distill stage under real 2-process DDP."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FP16_REFUSAL, accelerate_launch, assert_one_line_refusal, refuses_fp16, run_cli
from rounding import gamma, roundings_through
from weatherkd.losses import distill as D
from weatherkd.recipes.distill import compiler_missing



@pytest.fixture(scope="module")
def kd_inputs(builtin_set, tiny_teacher, tmp_path_factory):
    """The session's tiny teacher and a VQ, trained and exported by the real stages."""
    root = tmp_path_factory.mktemp("kd")
    run_cli("vq", "--config", "configs/vq/demo.yaml", f"out_dir={root / 'vq'}", f"data.train_shards={builtin_set}",
            "train.max_steps=4", "tracker.kind=none", "data.crop=32", "data.num_workers=0")
    return builtin_set, tiny_teacher, root / "vq" / "model"


def recording(fn, calls: list):
    """``fn``, appending the arguments of each call to ``calls``."""
    def recorded(*args):
        calls.append(args)
        return fn(*args)

    return recorded


def distill(out, shards, teacher, vq, *overrides, launch="cpu-ddp", check=True):
    return accelerate_launch(["weatherkd", "distill", "--config", "configs/distill/demo.yaml", f"out_dir={out}",
                              f"data.train_shards={shards}", f"teacher={teacher}", f"vq={vq}", "tracker.kind=none",
                              "data.crop=32", "train.eval_every=0", "train.log_every=2", "ckpt.every=4",
                              "history.every=[1,2]", "history.milestones=[4]", "train.schedule=constant",
                              *overrides], module=True, config=f"launch/{launch}.yaml", check=check)


def test_dckd_under_ddp_resumes_with_all_kd_state(kd_inputs, tmp_path):
    shards, teacher, vq = kd_inputs
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill(straight, shards, teacher, vq, "train.max_steps=8")
    distill(split, shards, teacher, vq, "train.max_steps=4")
    distill(split, shards, teacher, vq, "train.max_steps=8")
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(split / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resume must restore EMA, history model and its schedule"
    metrics = json.loads((split / "metrics.json").read_text())
    assert metrics["ranks_in_sync"] and metrics["world_size"] == 2 and metrics["random_init"] is True
    assert set(metrics["weathers"]) == {"rain_haze", "raindrop", "snow"}
    # The history model is in the checkpoint: 4 updates at s=1 (steps 1-4), then s=2 (steps 6, 8).
    from weatherkd.recipes.distill import Config, DistillRecipe
    from weatherkd import config as C

    cfg = C.load(Config, "configs/distill/demo.yaml", [f"teacher={teacher}", f"vq={vq}",
                                                             "history.every=[1,2]", "history.milestones=[4]"])
    recipe = DistillRecipe(cfg)
    assert [recipe.history_interval(s) for s in (1, 3, 4, 5, 8)] == [1, 1, 2, 2, 2]
    from weatherkd.engine import checkpoint

    state = checkpoint.load_state_tree(split / "checkpoints" / "step-0000008")["recipe"]
    assert state["history_updates"] == 6 and "history" in state
    spec = json.loads((split / "model" / "model.json").read_text())
    assert spec["arch"] == "unet_bn" and spec["objective"] == "dckd"


@pytest.mark.parametrize("launch,precision,ema", [("cpu-ddp", "bf16", []), ("cpu-zero2", "bf16", []),
                                                   ("cpu-zero2", "fp16", []), ("cpu-zero3", "fp16", ["train.ema_decay=0"])])
def test_dckd_in_16_bit_mixed_precision_updates_its_history_model_in_fp32(kd_inputs, tmp_path, launch, precision, ema):
    """Every real-size config trains in bf16; the history model (a frozen helper) was cast to bf16
    with the rest, and its first update ended the run (lerp of fp32 weights into bf16 ones).
    Under ZeRO the student itself is bf16 (DeepSpeed casts it; accelerate leaves autocast off):
    its first convolution refused the fp32 batch, its batch norm the fp32 statistics DeepSpeed
    leaves, the EMA the bf16 weights, and DeepSpeed's broadcast the channels_last ones; each
    rank's batch-norm statistics drifted apart (DeepSpeed never broadcasts buffers). Under ZeRO-3
    without an EMA, the history model's update stopped the run on the student's partitioned
    (empty) weights; gathered, it averages the 16-bit module's weights (as the EMA does), in fp32.
    In fp16 under DeepSpeed (its loss scaler), torch's grouped EMA update refused fp16 weights
    against fp32 averages (it lets bf16 through)."""
    shards, teacher, vq = kd_inputs
    proc = distill(tmp_path, shards, teacher, vq, "train.max_steps=4", f"train.mixed_precision={precision}", *ema,
                   launch=launch, check=not refuses_fp16(launch, precision))
    if refuses_fp16(launch, precision):  # where this CPU has no fp16 kernels: refused in one line instead
        return assert_one_line_refusal(proc, FP16_REFUSAL)
    from weatherkd.engine import checkpoint

    state = checkpoint.load_state_tree(tmp_path / "checkpoints" / "step-0000004")["recipe"]
    assert state["history_updates"] == 4
    history = {k: v for k, v in state["history"].items() if k.startswith("module.") and v.is_floating_point()}
    assert history and all(v.dtype == torch.float32 and v.isfinite().all() for v in history.values())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["ranks_in_sync"] and metrics["parallelism"] == {"cpu-ddp": "multi_cpu", "cpu-zero2": "deepspeed-zero2",
                                                                   "cpu-zero3": "deepspeed-zero3"}[launch]
    exported = load_file(tmp_path / "model" / "model.safetensors")  # the EMA's or the fp32 masters: not rounded
    conv = next(v for k, v in exported.items() if k.endswith(".weight") and v.dim() == 4)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert conv.dtype == torch.float32 and not torch.equal(conv, conv.to(half).float())


def test_frozen_parts_build_no_graph_and_targetless_tars_work(kd_inputs):
    shards, teacher, vq = kd_inputs
    from weatherkd.recipes.distill import Config, DistillRecipe
    from weatherkd import config as C

    cfg = C.load(Config, "configs/distill/demo.yaml", [f"teacher={teacher}", f"vq={vq}"])
    recipe = DistillRecipe(cfg)
    for module in recipe.frozen.values():
        module.requires_grad_(False).eval()
    x = torch.rand(2, 3, 32, 32)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        recipe.teacher_output({"input": x})
    assert packed == []
    losses = recipe.step(recipe.model, {"input": x}, step=0)  # no target: the teacher is the target
    assert {"kd", "contrast", "dmm", "loss"} <= set(losses) and "gt" not in losses
    losses["loss"].backward()
    assert all(p.grad is None for m in recipe.frozen.values() for p in m.parameters())
    assert all(p.grad is not None for p in recipe.model.parameters() if p.requires_grad)
    cached = torch.rand(2, 3, 32, 32)
    assert torch.equal(recipe.teacher_output({"input": x, "teacher": cached}), cached)

    # The negatives in bf16 under an fp32 student: the same terms, rounded, still fp32, and the
    # student's gradient moved by the rounding alone.
    terms, grads, seen = {}, {}, {}
    for precision in ("train", "bf16"):
        recipe.cfg.dckd.frozen_precision = precision
        recipe.generator.manual_seed(0)  # the same negatives
        recipe.model.zero_grad()
        recipe.contrastive = recording(D.contrastive, seen.setdefault(precision, []))
        terms[precision] = recipe.step(recipe.model, {"input": x}, step=0)
        terms[precision]["loss"].backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in recipe.model.parameters() if p.requires_grad])
        assert terms[precision]["contrast"].dtype == torch.float32
    recipe.contrastive = D.contrastive
    fp32, bf16 = terms["train"]["contrast"].item(), terms["bf16"]["contrast"].item()
    # Each negative's features went through the history model's bf16 copy and the VQ's (the VQ's
    # scaling of its input, the history's two interpolations and residual sum are no modules):
    # each feature is within γ_k of its fp32 value, relative to its level's largest (tests/rounding.py).
    # A level's term w·d(s, t)/D moves with D = Σ_n mean|s − n| alone, which moves by at most
    # Σ_n mean|δn| ≤ γ_k · Σ_n max|n|: a relative change of that over D, at most, per level.
    k = roundings_through(recipe.frozen_bf16("history", recipe.frozen["history"].module), functional=3) \
        + roundings_through(recipe.frozen_bf16("vq", recipe.frozen["vq"]), functional=1)
    student, _, negatives = seen["train"][0][:3]
    bound = max(gamma(k, torch.bfloat16) * sum(n[level].abs().max() for n in negatives)
                / sum((s - n[level]).abs().mean() for n in negatives) for level, s in enumerate(student))
    assert fp32 != bf16 and abs(bf16 - fp32) <= bound.item() * abs(fp32)
    assert not torch.equal(grads["train"], grads["bf16"])
    # The history model's bf16 copy follows the history model: a history update remakes it from
    # the updated history model (not the student), and a resume drops it.
    recipe.cfg.dckd.frozen_precision = "bf16"
    history = recipe.frozen["history"]
    stale = recipe.frozen_bf16("history", history.module)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in recipe.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    recipe.after_step(recipe.history_interval(0), recipe.model, None)
    fresh = recipe.frozen_bf16("history", history.module)
    assert fresh is not stale
    with torch.no_grad():
        for p in recipe.model.parameters():  # the student moves on; the history model stays
            p.add_(0.1 * torch.randn_like(p))
        want, student_out = history(x), recipe.model.eval()(x)
        got = fresh(x.to(torch.bfloat16)).float()
    recipe.model.train()
    # bf16's rounding of the history model: its copy's roundings (two interpolations and the
    # residual sum are no modules), against its largest output (tests/rounding.py)
    bound = gamma(roundings_through(fresh, functional=3), torch.bfloat16) * want.abs().max().item()
    assert (got - want).abs().max() <= bound
    assert (want - x).abs().max() > 2 * bound  # the history model is not the identity it started as
    assert (student_out - want).abs().max() > 2 * bound  # ... nor the student
    recipe.load_state_dict(recipe.state_dict())
    assert recipe.frozen_bf16("history", history.module) is not fresh
    # "train" under mixed precision: the engine's autocast reaches the history model.
    recipe.cfg.dckd.frozen_precision = "train"
    seen = []
    conv = next(m for m in recipe.frozen["history"].modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recipe.step(recipe.model, {"input": x}, step=0)
    hook.remove()
    assert seen == [torch.bfloat16]


def test_bench_kd_overhead_times_the_engines_real_step_online_and_cached(kd_inputs):
    from weatherkd.commands import bench

    shards, teacher, vq = kd_inputs
    out = bench.bench("kd-overhead")(["--steps", "1", "--warmup", "1", "--cache-shards", "1", "--profile-steps", "1",
                                        f"teacher={teacher}",
                                        f"vq={vq}", f"data.train_shards={shards}", "data.crop=32",
                                        "data.num_workers=0", "data.eval_max_samples=2"])
    compiled = {"dckd_online_compiled"} if compiler_missing() is None else set()  # where compile can build
    bases = {"kd_online", "kd_cached", "dckd_online", "dckd_cached"}
    assert set(out["seconds_per_step"]) == {"scratch", "dckd_online_negatives_bf16"} | bases | compiled | {
        f"{b}_consistency" for b in bases}  # fp32 training: bf16 negatives too; each with and without consistency
    parts = out["ms_per_step_by_part"]
    assert "distill/teacher" in parts["kd_online"] and "engine/backward" in parts["scratch"]
    for b in bases:  # its own label; from the cache, the teacher runs for this term only
        assert "distill/consistency_teacher" in parts[f"{b}_consistency"]
        assert "distill/consistency_teacher" not in parts[b]
        assert out["consistency_over_without"][b] == pytest.approx(out["seconds_per_step"][f"{b}_consistency"]
                                                                   / out["seconds_per_step"][b])
    assert "distill/dckd_history" in parts["dckd_cached"] and "distill/dckd_vq_frozen" in parts["dckd_online"]
    assert all(t > 0 for t in out["seconds_per_step"].values())  # figures, not a timing test: no bound on them
    assert out["kd_cached_over_scratch"] == pytest.approx(out["seconds_per_step"]["kd_cached"]
                                                          / out["seconds_per_step"]["scratch"])
    assert out["dckd_negatives_bf16_over_kd_online"] == pytest.approx(
        out["seconds_per_step"]["dckd_online_negatives_bf16"] / out["seconds_per_step"]["kd_online"])
    if compiled:
        assert "distill/dckd_contrast" in parts["dckd_online_compiled"]
        assert out["dckd_compiled_over_kd_online"] == pytest.approx(
            out["seconds_per_step"]["dckd_online_compiled"] / out["seconds_per_step"]["kd_online"])


def test_compiled_dckd_terms_are_the_eager_ones(kd_inputs):
    """``dckd.compile``: each term's value and gradient are the eager ones (fp32 students; bf16
    negatives promoted as they are subtracted; a tie, sign(0) = 0), and it is compiled, one graph."""
    if missing := compiler_missing():
        pytest.skip(missing)
    from torch._dynamo.utils import counters

    shards, teacher, vq = kd_inputs
    from weatherkd import config as C
    from weatherkd import models
    from weatherkd.recipes.distill import Config, DistillRecipe

    torch.manual_seed(0)
    shapes, weights = [(2, 4, 8, 8), (2, 8, 4, 4)], [0.25, 1.0]
    s = [torch.randn(*sh, requires_grad=True) for sh in shapes]
    t = [torch.randn(*sh) for sh in shapes]
    negs = [[torch.randn(*sh).to(torch.bfloat16) for sh in shapes] for _ in range(3)]
    with torch.no_grad():
        s[0][0, 0, 0, 0] = negs[0][0][0, 0, 0, 0].float()  # a tie with a negative
        s[1][0, 0, 0, 0] = t[1][0, 0, 0, 0]  # and with the teacher
    torch._dynamo.reset()  # graphs compiled earlier in this process (the bench test's) would be reused
    graphs = counters["stats"]["unique_graphs"]
    compiled = D.compiled(D.contrastive_formula)(s, t, negs, weights)
    assert counters["stats"]["unique_graphs"] > graphs  # traced and compiled, not run eagerly
    eager = D.contrastive(s, t, negs, weights)
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
    eager_grads = torch.autograd.grad(eager, s)
    for g, w in zip(torch.autograd.grad(compiled, s), eager_grads):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6 * w.abs().max().item())
    # channels_last features (the engine's `train.channels_last`) get channels_last gradients: the
    # VQ's backward on mixed layouts was the slowest part of the compiled step.
    s_nhwc = [f.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for f in s]
    t_nhwc = [f.contiguous(memory_format=torch.channels_last) for f in t]
    negs_nhwc = [[f.contiguous(memory_format=torch.channels_last) for f in neg] for neg in negs]
    compiled = D.compiled(D.contrastive_formula)(s_nhwc, t_nhwc, negs_nhwc, weights)
    for g, w in zip(torch.autograd.grad(compiled, s_nhwc), eager_grads):
        assert g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous()
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6 * w.abs().max().item())
    # Distribution matching on its own: its gradient is ~1e-5 of the whole loss's, so a check of
    # the loss's gradient cannot see it. Latents apart, so the gradient (softmax minus the teacher's
    # distribution) does not cancel to rounding noise.
    vq_model = models.load(vq).requires_grad_(False)
    vq_model.codebook.weight.normal_(0, 0.5)  # codes spread as a trained codebook's are, not at init scale
    codebook = vq_model.code_logits
    student_latent, teacher_latent = torch.randn(2, 16, 4, 4, requires_grad=True), torch.randn(2, 16, 4, 4)
    compiled = D.compiled(D.code_mapping)(codebook, student_latent, teacher_latent)
    eager = D.code_mapping(codebook, student_latent, teacher_latent)
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
    g, w = torch.autograd.grad(compiled, student_latent)[0], torch.autograd.grad(eager, student_latent)[0]
    # fp32's own error on this gradient against float64: ~1e-6 of its largest element here
    assert w.abs().max() > 0 and torch.allclose(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())

    # Through the recipe, in both frozen precisions: the recipe hands its features to the compiled
    # terms, which give the eager terms' values, and the contrastive term's gradient to the
    # student's features, on the same inputs. The inputs are recorded, not computed twice: oneDNN's
    # bf16 kernels may round the negatives differently from one call to the next on some CPUs (AMX),
    # and a compiled-against-eager check must not see that. On identical inputs only the order of
    # fp32 sums differs: each is within γ_n (fp32) of exact for n terms, and a gradient element
    # w/(N·D)·(sign(s − t) − d(s, t)/D · Σ sign(s − n)) takes three of them (tests/rounding.py).
    x = torch.rand(2, 3, 32, 32)
    for precision in ("train", "bf16"):  # the negatives in the student's precision, or as bf16 copies
        cfg = C.load(Config, "configs/distill/demo.yaml", [f"teacher={teacher}", f"vq={vq}", "objective=dckd",
                                                           "dckd.compile=true", f"dckd.frozen_precision={precision}"])
        torch.manual_seed(0)
        recipe = DistillRecipe(cfg)
        assert recipe.contrastive is D.compiled(D.contrastive_formula)
        assert recipe.code_mapping is D.compiled(D.code_mapping)
        for module in recipe.frozen.values():
            module.requires_grad_(False).eval()
        contrast_calls, mapping_calls = [], []
        recipe.contrastive = recording(recipe.contrastive, contrast_calls)
        recipe.code_mapping = recording(recipe.code_mapping, mapping_calls)
        terms = recipe.step(recipe.model, {"input": x}, step=0)
        (args,), (mapping_args,) = contrast_calls, mapping_calls
        student, _, negatives = args[:3]
        assert negatives[1][0].dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        eager = cfg.dckd.w_contrast * D.contrastive(*args)
        n = max(f.numel() for f in student)
        assert terms["contrast"].item() == pytest.approx(eager.item(), rel=3 * gamma(n, torch.float32)), precision
        eager_dmm = cfg.dckd.w_dmm * D.code_mapping(*mapping_args)
        assert terms["dmm"].item() == pytest.approx(eager_dmm.item(), rel=3 * gamma(n, torch.float32)), precision
        want = torch.autograd.grad(eager, student, retain_graph=True)  # the compiled backward frees its graph
        for g, w in zip(torch.autograd.grad(terms["contrast"], student), want, strict=True):
            assert w.abs().max() > 0
            assert torch.allclose(g, w, rtol=0, atol=3 * gamma(n, torch.float32) * w.abs().max().item()), precision


def test_compile_without_a_compiler_is_one_line(kd_inputs, tmp_path):
    shards, teacher, vq = kd_inputs
    from conftest import cli_env

    proc = run_cli("distill", "--config", "configs/distill/demo.yaml", f"out_dir={tmp_path / 'out'}",
                   f"data.train_shards={shards}", f"teacher={teacher}", f"vq={vq}", "objective=dckd",
                   "dckd.compile=true", "tracker.kind=none", check=False,
                   env=cli_env(CXX="/nonexistent/g++",  # and no cache of earlier builds: a machine without one
                               TORCHINDUCTOR_FORCE_DISABLE_CACHES="1"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: dckd.compile: torch.compile cannot build on this machine's cpu")
    assert "/nonexistent/g++" in line  # why, in the compiler's words
